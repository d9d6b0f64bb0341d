"""Distilling a language-model head without materialising the logits: a teacher and a smaller
student (embedding + a small body + an output Dense over the vocabulary, different hidden sizes)
on a synthetic token language, a Keras model whose custom train_step calls
tf_kld.linear_distillation_loss on the hidden states and the two output kernels, so the
[tokens, vocabulary] logits never exist. Prints the loss per epoch, how often the student's top
token agrees with the teacher's before and after, and the peak memory of one training step next to
the materialised path's (logits = h @ W + b, then keras.losses.kl_divergence of the softmaxes).

    python examples/linear_distillation_demo.py [--epochs 4] [--smoke]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "bench"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bench  # noqa: E402  (the benchmarks' fresh-process, calibrated peak-memory measurement)
import tf_kld  # noqa: E402

TEMPERATURE = 2.0
# (vocabulary, sequences, tokens per sequence, batch, teacher hidden, student hidden, epochs)
FULL = dict(vocab=1024, sequences=2048, length=16, batch=64, teacher_hidden=128, student_hidden=48,
            epochs=4)
SMOKE = dict(vocab=64, sequences=512, length=8, batch=32, teacher_hidden=32, student_hidden=16,
             epochs=3)
MEMORY_VOCAB, SMOKE_MEMORY_VOCAB = 32000, 4096  # the step whose memory is measured: a real vocabulary


def make_language(vocab, seed=0):
    """A random bigram language: each token is followed by one of 4 tokens (probabilities drawn per
    token). Token 0 is padding and never generated."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, size=(vocab, 4))
    probs = rng.dirichlet(np.full(4, 0.5), size=vocab)
    return successors, np.cumsum(probs, axis=1)


def make_data(language, sequences, length, seed):
    """Token sequences of random lengths (length // 2 to length), padded with 0; weights 0 on padding."""
    successors, cumulative = language
    rng = np.random.default_rng(seed)
    tokens = np.zeros((sequences, length + 1), np.int32)
    tokens[:, 0] = rng.integers(1, len(successors), size=sequences)
    for i in range(1, length + 1):
        pick = (rng.random(sequences)[:, None] > cumulative[tokens[:, i - 1]]).sum(axis=1)
        tokens[:, i] = successors[tokens[:, i - 1], np.minimum(pick, 3)]
    lengths = rng.integers(length // 2, length + 1, size=sequences)
    weights = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    inputs = np.where(weights > 0, tokens[:, :-1], 0).astype(np.int32)
    return inputs, tokens[:, 1:], weights


def language_model(vocab, hidden, name):
    """(body: tokens -> hidden states [batch, length, hidden], head: the output Dense to vocab)."""
    body = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(vocab, hidden),
                             keras.layers.Dense(hidden, activation="gelu")], name=f"{name}_body")
    head = keras.layers.Dense(vocab, name=f"{name}_head")
    head.build((None, None, hidden))
    return body, head


class LinearDistiller(keras.Model):
    """Trains the student's body and head to match the (frozen) teacher's next-token distribution."""

    def __init__(self, teacher, student, temperature=TEMPERATURE, fused=True):
        super().__init__()
        self.teacher_body, self.teacher_head = teacher
        self.student_body, self.student_head = student
        self.teacher_body.trainable = self.teacher_head.trainable = False
        self.temperature, self.fused = temperature, fused
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, tokens):
        return self.student_head(self.student_body(tokens))

    @property
    def metrics(self):
        return [self.loss_tracker]

    def distillation_loss(self, tokens, weights):
        h_t = self.teacher_body(tokens, training=False)
        h_s = self.student_body(tokens, training=True)
        if self.fused:  # [batch, length, vocab] logits never exist
            return tf_kld.linear_distillation_loss(
                h_s, self.student_head.kernel, h_t, self.teacher_head.kernel,
                student_bias=self.student_head.bias, teacher_bias=self.teacher_head.bias,
                temperature=self.temperature, sample_weight=weights)
        # What a Keras user writes otherwise: the logits of both models, materialised.
        s = self.student_head(h_s) / self.temperature
        t = self.teacher_head(h_t) / self.temperature
        per_token = keras.losses.kl_divergence(tf.nn.softmax(t), tf.nn.softmax(s))
        return tf.math.divide_no_nan(tf.reduce_sum(per_token * weights), tf.reduce_sum(weights))

    def loss_and_gradients(self, tokens, weights):
        with tf.GradientTape() as tape:
            loss = self.distillation_loss(tokens, weights)
        return loss, tape.gradient(loss, self.student_variables())

    def student_variables(self):
        return self.student_body.trainable_variables + self.student_head.trainable_variables

    def train_step(self, data):
        tokens, weights = data
        loss, grads = self.loss_and_gradients(tokens, weights)
        self.optimizer.apply_gradients(zip(grads, self.student_variables()))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def top1_agreement(a, b, tokens, weights):
    """How often two (body, head) pairs predict the same next token, over the non-padding tokens."""
    def top1(model):
        body, head = model
        return np.argmax(head(body(tokens)).numpy(), axis=-1)
    return float(np.sum((top1(a) == top1(b)) * weights) / np.sum(weights))


def memory_child(kind, batch, length, vocab, teacher_hidden, student_hidden):
    """In a fresh process: peak extra memory of one forward+backward distillation step (no update)."""
    keras.utils.set_random_seed(0)
    distiller = LinearDistiller(language_model(vocab, teacher_hidden, "teacher"),
                                language_model(vocab, student_hidden, "student"),
                                fused=kind == "fused")
    rng = np.random.default_rng(0)
    tokens = tf.constant(rng.integers(1, vocab, size=(batch, length)), tf.int32)
    weights = tf.ones([batch, length])
    bench.measure_in_child(tf.function(distiller.loss_and_gradients), (tokens, weights),
                                  (student_hidden, vocab))  # calibration: the kernel gradient's size


def step_memory(config, vocab):
    """{"fused": {"bytes", "note"}, "materialised": ...} of one step at `vocab`, each in a fresh process."""
    args = [str(v) for v in (config["batch"], config["length"], vocab, config["teacher_hidden"],
                             config["student_hidden"])]
    return {kind: bench.peak_memory_in_child(__file__, [kind] + args) for kind in ("fused", "materialised")}


def _mib(peak):
    return f"{peak['bytes'] / 2**20:.1f} MiB" if peak["bytes"] is not None else peak["note"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration (the tests' run)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        kind, *sizes = args.memory_child
        return memory_child(kind, *(int(v) for v in sizes))
    config = dict(SMOKE if args.smoke else FULL)
    if args.epochs is not None:
        config["epochs"] = args.epochs
    vocab = config["vocab"]
    keras.utils.set_random_seed(1)
    language = make_language(vocab)
    x, y, w = make_data(language, config["sequences"], config["length"], seed=1)
    x_test, _, w_test = make_data(language, 512, config["length"], seed=2)

    # The teacher: a language model trained on the data (the logits are small here: V = vocab).
    teacher = language_model(vocab, config["teacher_hidden"], "teacher")
    teacher_lm = keras.Sequential(list(teacher))
    teacher_lm.compile(optimizer=keras.optimizers.Adam(1e-2),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher_lm.fit(x, y, sample_weight=w, epochs=config["epochs"], batch_size=config["batch"],
                   verbose=0)

    student = language_model(vocab, config["student_hidden"], "student")
    distiller = LinearDistiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = top1_agreement(student, teacher, x_test, w_test)
    data = tf.data.Dataset.from_tensor_slices((x, w)).shuffle(len(x), seed=1).batch(config["batch"])
    history = distiller.fit(data, epochs=config["epochs"], verbose=0, shuffle=False)  # shuffled above
    after = top1_agreement(student, teacher, x_test, w_test)

    losses = [float(v) for v in history.history["loss"]]
    print(f"fused linear distillation: vocabulary {vocab}, teacher hidden {config['teacher_hidden']}, "
          f"student hidden {config['student_hidden']}, T = {TEMPERATURE}")
    print(f"distillation loss per epoch: {', '.join(f'{v:.4f}' for v in losses)}")
    print(f"student top-1 agrees with the teacher's on {before:.1%} of tokens before distillation, "
          f"{after:.1%} after")
    result = {"losses": losses, "agreement_before": before, "agreement_after": after}
    if not args.no_memory:
        memory_vocab = SMOKE_MEMORY_VOCAB if args.smoke else MEMORY_VOCAB
        peaks = step_memory(config, memory_vocab)
        fused, materialised = peaks["fused"], peaks["materialised"]
        ratio = (f" ({materialised['bytes'] / fused['bytes']:.1f}x less)"
                 if fused["bytes"] and materialised["bytes"] else "")
        print(f"peak extra memory of one training step ({config['batch']} x {config['length']} tokens, "
              f"vocabulary {memory_vocab}, fresh processes): fused {_mib(fused)}, materialised "
              f"logits {_mib(materialised)}{ratio}")
        result["memory"] = peaks
    return result


if __name__ == "__main__":
    main()
