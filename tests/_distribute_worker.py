"""Keras training with tf_kld's KLDivergence under tf.distribute, run by tests/test_distribute.py in
fresh processes (logical devices and the cluster must be set up before TensorFlow initialises).

    python3 _distribute_worker.py mirrored      # MirroredStrategy over two logical CPU devices
    python3 _distribute_worker.py multiworker   # MultiWorkerMirroredStrategy; TF_CONFIG names the task

Both train the same small softmax student (fixed seeds, global batch 64 = 2 replicas x 32, samples in
order) several times under one strategy:

    "custom"    - the default implementation ("auto") without XLA: the fused custom op
    "reference" - under tf_kld.implementation("reference")
    "keras"     - Keras's own KLDivergence loss (independent of tf_kld's implementation switch)
    "xla"       - (multiworker) the default implementation, the step jit-compiled: the XLA path
    "single"    - (mirrored) the custom op without any strategy

mirrored trains with Keras `model.fit`. multiworker trains with a custom loop (`strategy.run`, the
Keras optimizer all-reducing the gradients): Keras 3's fit() does not work under
MultiWorkerMirroredStrategy whatever the loss (keras-team/keras#20585, tensorflow/tensorflow#72388:
`_maybe_symbolic_build` reduces a tuple of PerReplica, and `reduce_per_replica` reduces the scalar
step logs with axis=0, "Invalid reduction dimension 0 for input with 0 dimensions").
Keras 3 cannot jit-compile a MirroredStrategy step spanning two devices of one process either, with
any loss ("Trying to access resource ... located in device CPU:1 from device CPU:0"), so "xla" is
multiworker only.

Prints one line `RESULT {json}`: per run the per-epoch mean losses and the tf_kld op nodes (type,
device) in the graphs of the training step.
"""

import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

MODE = sys.argv[1] if len(sys.argv) > 1 else None
if MODE == "mirrored":  # before anything initialises the TensorFlow context
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
elif MODE != "multiworker":
    sys.exit(f"usage: {sys.argv[0]} mirrored|multiworker")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_kld  # noqa: E402

keras.config.disable_traceback_filtering()  # full tracebacks in the test's failure messages

SAMPLES, FEATURES, CLASSES = 256, 8, 4
BATCH = 64  # global batch
EPOCHS = 3
LEARNING_RATE = 0.5


def data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    logits = rng.normal(size=(SAMPLES, CLASSES))
    y = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return x, y.astype("float32")


def new_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((FEATURES,)),
                             keras.layers.Dense(CLASSES, activation="softmax")])


def tf_kld_nodes(functions):
    """The distinct (op type, device) of the tf_kld ops in the traced graphs of the given
    tf.functions, their function libraries included (where the per-replica steps live). Nodes of
    nested functions carry no device ("")."""
    nodes, traced = [], 0
    for fn in functions:
        for concrete in fn._list_all_concrete_functions():  # pylint: disable=protected-access
            traced += 1
            graph_def = concrete.graph.as_graph_def()
            defs = list(graph_def.node)
            for lib_fn in graph_def.library.function:
                defs.extend(lib_fn.node_def)
            nodes.extend((n.op, n.device) for n in defs if n.op.startswith("TfKld>"))
    return {"traced_functions": traced, "nodes": sorted(set(nodes))}


def fit(strategy, loss, impl="auto"):
    """Keras fit(); the tf.functions behind model.train_function are found in its closure."""
    x, y = data()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope, tf_kld.implementation(impl):
        model = new_model()
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=loss, jit_compile=False)
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, shuffle=False)
    functions = [cell.cell_contents for cell in model.train_function.__closure__ or ()
                 if hasattr(cell.cell_contents, "_list_all_concrete_functions")]
    return {"loss": [float(v) for v in history.history["loss"]], **tf_kld_nodes(functions)}


def custom_loop(strategy, loss_cls, impl="auto", jit_compile=False):
    """The tf.distribute custom training loop: per replica the loss summed over its examples and
    divided by the global batch, gradients all-reduced by the Keras optimizer."""
    x, y = data()

    def dataset_fn(input_context):
        # Replica r of global batch i: samples [64 i + 32 r, 64 i + 32 r + 32), in order.
        per_replica = input_context.get_per_replica_batch_size(BATCH)
        start = input_context.input_pipeline_id * per_replica
        idx = np.concatenate([np.arange(b + start, b + start + per_replica)
                              for b in range(0, SAMPLES, BATCH)])
        return tf.data.Dataset.from_tensor_slices((x[idx], y[idx])).batch(per_replica)

    with strategy.scope():
        model = new_model()
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)
        loss_fn = loss_cls(reduction=None)
    dist = strategy.distribute_datasets_from_function(
        dataset_fn, tf.distribute.InputOptions(experimental_fetch_to_device=False))

    @tf.function(jit_compile=jit_compile)
    def loss_and_grads(xb, yb):
        with tf.GradientTape() as tape:
            per_example = loss_fn(yb, model(xb, training=True))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=BATCH)
        return loss, tape.gradient(loss, model.trainable_variables)

    def replica_step(xb, yb):
        loss, grads = loss_and_grads(xb, yb)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    epochs = []
    with tf_kld.implementation(impl):
        for _ in range(EPOCHS):
            epochs.append(float(np.mean([train_step(batch).numpy() for batch in dist])))
    return {"loss": epochs, **tf_kld_nodes([train_step, loss_and_grads])}


def main():
    start = time.time()
    out = {"mode": MODE, "custom_op_loaded": tf_kld.custom_op_loaded(),
           "default_implementation": tf_kld.current_implementation()}
    if MODE == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        runs = {
            "custom": lambda: fit(strategy, tf_kld.KLDivergence()),
            "reference": lambda: fit(strategy, tf_kld.KLDivergence(), impl="reference"),
            "keras": lambda: fit(strategy, keras.losses.KLDivergence()),
            "single": lambda: fit(None, tf_kld.KLDivergence()),
        }
    else:
        # Every worker joins the cluster (creates the strategy) before building any model.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        out["task"] = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        runs = {
            "custom": lambda: custom_loop(strategy, tf_kld.KLDivergence),
            "reference": lambda: custom_loop(strategy, tf_kld.KLDivergence, impl="reference"),
            "keras": lambda: custom_loop(strategy, keras.losses.KLDivergence),
            "xla": lambda: custom_loop(strategy, tf_kld.KLDivergence, jit_compile=True),
        }
    out["replicas"] = strategy.num_replicas_in_sync
    # The same runs in the same order on every worker: their collectives must pair up.
    for name, run in runs.items():
        out[name] = run()
    out["seconds"] = round(time.time() - start, 2)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
