"""The documented TypeError ("If y_true cannot be cast to the y_pred.dtype"), eager and in graphs,
with a message naming both dtypes. (TF 2.21 raises UnimplementedError for a string y_true tensor.)"""

import numpy as np
import pytest
import tensorflow as tf

import tf_kld

F32 = [0.5, 0.5]

# case: (make y_true, make y_pred, y_true dtype, y_pred dtype); built inside the graph when traced.
CASES = {
    "string_tensor_y_true": (lambda: tf.constant(["a", "b"]), lambda: F32, "string", "float32"),
    "string_list_y_true": (lambda: ["a", "b"], lambda: F32, "string", "float32"),
    "string_numpy_y_true": (lambda: np.array(["a", "b"]), lambda: F32, "string", "float32"),
    "string_y_true_float64": (lambda: tf.constant(["a", "b"]), lambda: tf.constant(F32, tf.float64),
                              "string", "float64"),
    "int_tensor_y_pred": (lambda: F32, lambda: tf.constant([1, 2]), "float32", "int32"),
    "int_list_y_pred": (lambda: tf.constant(F32), lambda: [1, 2], "float32", "int32"),
    "int64_y_pred": (lambda: tf.constant(F32, tf.float64), lambda: tf.constant([1, 2], tf.int64),
                     "float64", "int64"),
    "bool_y_pred": (lambda: F32, lambda: [True, False], "float32", "bool"),
    "string_y_pred": (lambda: F32, lambda: tf.constant(["a", "b"]), "float32", "string"),
    "string_both": (lambda: ["a"], lambda: ["b"], "string", "string"),
}


def _call(case, mode):
    make_true, make_pred = CASES[case][:2]
    if mode == "eager":
        return tf_kld.kl_divergence(make_true(), make_pred())
    return tf.function(lambda: tf_kld.kl_divergence(make_true(), make_pred()), autograph=False)()


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_type_error(impl, case, mode):
    true_dtype, pred_dtype = CASES[case][2:]
    with pytest.raises(TypeError) as info:
        _call(case, mode)
    message = str(info.value)
    assert f"y_true dtype {true_dtype}" in message or f"y_true has dtype {true_dtype}" in message, message
    assert f"y_pred dtype {pred_dtype}" in message or f"y_pred has dtype {pred_dtype}" in message, message


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_string_y_true_names_the_cast(impl, mode):
    with pytest.raises(TypeError, match=r"y_true cannot be cast to y_pred\.dtype"):
        _call("string_tensor_y_true", mode)


def test_traced_signature_raises_at_trace(impl):
    fn = tf.function(tf_kld.kl_divergence)
    with pytest.raises(TypeError, match="y_true has dtype string"):
        fn.get_concrete_function(tf.TensorSpec([None, 2], tf.string), tf.TensorSpec([None, 2], tf.float32))
    with pytest.raises(TypeError, match="y_pred dtype int32"):
        fn.get_concrete_function(tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([None, 2], tf.int32))


@pytest.mark.parametrize("y_true", [[0, 1], [True, False], np.array([0, 1], np.int64)], ids=str)
def test_castable_y_true_is_accepted(impl, y_true):
    """Integer and bool y_true cast fine, as in Keras."""
    got = tf_kld.kl_divergence(y_true, [0.4, 0.6])
    np.testing.assert_allclose(got.numpy(), tf_kld.reference.kl_divergence(
        np.asarray(y_true, np.float32), [0.4, 0.6]).numpy(), rtol=1e-6)
