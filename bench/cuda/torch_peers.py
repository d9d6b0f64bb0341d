"""PyTorch on the same GPU as the CUDA harness: torch.nn.functional.kl_div, eager and torch.compile,
timed like the harness times tf_kld's kernels (same shapes and dtypes, cold L2, median of CUDA-event
timings) and printed beside them.

    python3 bench/cuda/torch_peers.py --harness bench/out/cuda_harness.json --out bench/out/cuda_peers

The same semantics as tf_kld: both inputs clipped to [eps, 1], sum over the last axis; fwd+bwd is the
loss and its gradient w.r.t. y_pred with the loss itself as the upstream gradient. The distillation
rows (modes "kl_logits ..." and "jsd ...", T = 2, beta = 0.5) are compared with
kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True, reduction="none").sum(-1) and the
generalized JSD written the same way, on random logits, gradient w.r.t. the student only. tools/cuda_harness.sh
runs this when PyTorch with CUDA is importable. Writes OUT.json and OUT.md (a table of ratios: torch's
time divided by tf_kld's).
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def kl_div(y_true, y_pred, eps):
    t = y_true.clamp(eps, 1.0)
    p = y_pred.clamp(eps, 1.0)
    return F.kl_div(p.log(), t, reduction="none").sum(-1)


DISTILL_T, DISTILL_BETA = 2.0, 0.5  # as the harness times its distillation kernels


def kl_logits(teacher, student):
    return F.kl_div(F.log_softmax(student / DISTILL_T, -1), F.log_softmax(teacher / DISTILL_T, -1),
                    log_target=True, reduction="none").sum(-1)


def jsd_logits(teacher, student):
    lp, lq = F.log_softmax(teacher / DISTILL_T, -1), F.log_softmax(student / DISTILL_T, -1)
    beta = torch.tensor(DISTILL_BETA, dtype=lp.dtype, device=lp.device)
    lm = torch.logsumexp(torch.stack([lp + beta.log(), lq + torch.log1p(-beta)]), 0)
    return (DISTILL_BETA * F.kl_div(lm, lp, log_target=True, reduction="none").sum(-1) +
            (1 - DISTILL_BETA) * F.kl_div(lm, lq, log_target=True, reduction="none").sum(-1))


def median_ms(fn, flush, reps):
    times = []
    for k in range(reps + 2):
        flush.fill_(k & 0xFF)  # cold L2, as in the harness
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if k >= 2:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harness", required=True, help="the harness's JSON results")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--quick", action="store_true")
    args, _ = parser.parse_known_args()
    with open(args.harness) as f:
        harness = json.load(f)
    reps = 5 if args.quick else 21
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device="cuda")
    peers = {"": (kl_div, torch.compile(kl_div, dynamic=False)),
             "kl_logits": (kl_logits, torch.compile(kl_logits, dynamic=False)),
             "jsd": (jsd_logits, torch.compile(jsd_logits, dynamic=False))}
    results = []
    for row in harness["results"]:
        if "fast" in row["mode"]:  # tf_kld's optional fast-math variants: compared with the default only
            continue
        dtype = DTYPES[row["dtype"]]
        shape = (row["rows"], row["cols"])
        family = row["mode"].split()[0] if " " in row["mode"] else ""
        forward_only = row["mode"].endswith("fwd")
        if family:  # logits, no epsilon
            eps = None
            y_true = torch.randn(shape, device="cuda").to(dtype)
            y_pred = torch.randn(shape, device="cuda").to(dtype)
        else:
            eps = float(torch.tensor(1e-7, dtype=dtype))
            y_true = torch.softmax(torch.randn(shape, device="cuda"), -1).to(dtype)
            y_pred = torch.softmax(torch.randn(shape, device="cuda"), -1).to(dtype)
        y_pred.requires_grad_(not forward_only)
        entry = dict(row, tf_kld_ms=row["ms"])
        for name, fn in zip(("eager", "compile"), peers[family]):
            args_of = (lambda fn=fn: fn(y_true, y_pred)) if family else (lambda fn=fn: fn(y_true, y_pred, eps))
            if forward_only:
                def run(call=args_of):
                    with torch.no_grad():
                        call()
            else:
                def run(call=args_of):
                    loss = call()
                    torch.autograd.grad(loss, y_pred, grad_outputs=loss.detach())
            try:
                run()  # warm up (compiles)
                entry[f"{name}_ms"] = median_ms(run, flush, reps)
            except Exception as err:  # pylint: disable=broad-except
                entry[f"{name}_ms"] = None
                entry[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]
        results.append(entry)
        ratios = " ".join(f"{n} {entry[f'{n}_ms'] / row['ms']:.2f}x" if entry.get(f"{n}_ms") else f"{n} -"
                          for n in ("eager", "compile"))
        print(f"  {row['dtype']:8} {row['mode']:18} {row['rows']}x{row['cols']}: tf_kld {row['ms']:.4f} ms, "
              f"vs torch {ratios}")
    meta = {k: v for k, v in harness.items() if k != "results"}
    meta["torch"] = torch.__version__
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta, results=results), f, indent=1)
    lines = [f"{meta['device']} (sm {meta['compute_capability']}), torch {torch.__version__}; "
             f"device-to-device copy {meta['copy_gbps']:.0f} GB/s. \"vs X\" = X's time / tf_kld's.", "",
             "| dtype | shape | mode | tf_kld ms | GB/s | % of copy | vs torch eager | vs torch compile |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for e in results:
        ratio = {n: (f"{e[f'{n}_ms'] / e['ms']:.2f}x" if e.get(f"{n}_ms") else "-")
                 for n in ("eager", "compile")}
        lines.append(f"| {e['dtype']} | {e['rows']}x{e['cols']} | {e['mode']} | {e['ms']:.4f} | "
                     f"{e['gbps']:.0f} | "
                     f"{100 * e['fraction_of_copy']:.0f}% | {ratio['eager']} | {ratio['compile']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
