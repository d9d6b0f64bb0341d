"""tf_kld.linear_distillation_loss under MirroredStrategy over two logical CPU devices, run by
tests/test_linear.py in a fresh process (logical devices must be set up before TensorFlow
initialises).

    python3 _linear_distribute_worker.py

One tf.function step as users write it: `strategy.run` of a replica function that takes the loss
of its half of the rows and its gradients w.r.t. its hidden states and the mirrored student kernel
and bias, the losses and the kernel/bias gradients summed over replicas. Without sample_weight each
replica's loss is divided by the number of replicas (as Keras does); with sample_weight it is
weighted by the replica's share of the global weight (an all-reduce), which makes the sum the global
weighted mean whatever the split. float64, so the results must equal the single-device call's.

Prints one line `RESULT {json}`: per case ("unweighted", "weighted") the strategy's and the single
device's loss and gradients, and the number of replicas.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]  # before anything initialises the context
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import numpy as np  # noqa: E402

import tf_kld  # noqa: E402

ROWS, HS, HT, CLASSES = 34, 8, 6, 50  # 17 rows per replica: not a multiple of the chunk
KWARGS = dict(temperature=2.0, beta=0.5)


def data():
    rng = np.random.default_rng(7)
    x = {"hs": rng.normal(size=(ROWS, HS)), "ws": rng.normal(size=(HS, CLASSES)),
         "bs": rng.normal(size=(CLASSES,)), "ht": rng.normal(size=(ROWS, HT)),
         "wt": rng.normal(size=(HT, CLASSES)), "bt": rng.normal(size=(CLASSES,)),
         "w": rng.uniform(0.0, 2.0, size=(ROWS,))}
    x["w"][::5] = 0.0  # rows of weight 0 on both replicas
    return x


def single_device(x, weighted, chunk_size):
    hs, ws, bs = (tf.constant(x[k]) for k in ("hs", "ws", "bs"))
    with tf.GradientTape() as tape:
        tape.watch([hs, ws, bs])
        loss = tf_kld.linear_distillation_loss(
            hs, ws, tf.constant(x["ht"]), tf.constant(x["wt"]), student_bias=bs,
            teacher_bias=tf.constant(x["bt"]), sample_weight=x["w"] if weighted else None,
            chunk_size=chunk_size, **KWARGS)
    return [loss] + tape.gradient(loss, [hs, ws, bs])


def mirrored(strategy, x, weighted, chunk_size):
    replicas = strategy.num_replicas_in_sync
    per = ROWS // replicas

    def split(name):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(x[name][ctx.replica_id_in_sync_group * per:
                                            (ctx.replica_id_in_sync_group + 1) * per]))

    with strategy.scope():
        ws, bs = tf.Variable(x["ws"]), tf.Variable(x["bs"])
    wt, bt = tf.constant(x["wt"]), tf.constant(x["bt"])

    def replica_fn(hs, ht, w):
        with tf.GradientTape() as tape:
            tape.watch(hs)
            loss = tf_kld.linear_distillation_loss(
                hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                sample_weight=w if weighted else None, chunk_size=chunk_size, **KWARGS)
            if weighted:  # this replica's share of the global weighted mean
                local = tf.reduce_sum(w)
                total = tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, local)
                loss = loss * tf.math.divide_no_nan(local, total)
            else:
                loss = loss / replicas
        d_hs, d_ws, d_bs = tape.gradient(loss, [hs, ws, bs])
        return loss, d_hs, d_ws, d_bs

    @tf.function
    def step(hs, ht, w):
        loss, d_hs, d_ws, d_bs = strategy.run(replica_fn, args=(hs, ht, w))
        total = [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in (loss, d_ws, d_bs)]
        return total[0], strategy.experimental_local_results(d_hs), total[1], total[2]

    loss, d_hs, d_ws, d_bs = step(split("hs"), split("ht"), split("w"))
    return [loss, tf.concat(d_hs, axis=0), d_ws, d_bs]


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = data()
    out = {"replicas": strategy.num_replicas_in_sync}
    for name, weighted, chunk_size in (("unweighted", False, None), ("weighted", True, 5)):
        out[name] = {"mirrored": [np.asarray(v).tolist() for v in mirrored(strategy, x, weighted, chunk_size)],
                     "single": [np.asarray(v).tolist() for v in single_device(x, weighted, chunk_size)]}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
