"""Checks shared by the fuzz tests: an op given fuzzed arguments either rejects them with a clean error that names a
bad argument, or accepts them when none is bad; either way it leaves its inputs as they were."""
import torch


def snapshot(*tensors):
    return [None if t is None else t.clone() for t in tensors]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if b is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        if b.is_floating_point():
            assert torch.equal(b.isnan(), a.isnan()), "input modified (NaN pattern)"
            assert torch.equal(b.nan_to_num(), a.nan_to_num()), "input modified"
        else:
            assert torch.equal(b, a), "input modified"


def expect_error(exc, bad_names):
    """An error must be one of the clean kinds, expected, and name one of the bad arguments."""
    assert isinstance(exc, (ValueError, RuntimeError)), f"unclean error {type(exc).__name__}: {exc}"
    assert bad_names, f"valid input rejected: {exc}"
    assert any(n in str(exc) for n in bad_names), f"error {exc!r} names none of {bad_names}"


def call_checked(fn, inputs, bad, *, may_reject_for=(), written=()):
    """Runs fn(), which reads the tensors `inputs` (None entries are skipped). `bad` names the arguments the fuzzer
    made invalid: with any, fn must raise a clean error naming one of them (or one of `may_reject_for`, arguments
    that may but need not be rejected); with none, it must return. A rejection leaves every input unchanged; an
    acceptance every input but those at the positions `written` (an in-place op's outputs).
    Returns (accepted, fn's result)."""
    before = snapshot(*inputs)
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - the kind is checked
        expect_error(e, list(bad) + list(may_reject_for))
        assert_unchanged(before, inputs)
        return False, None
    assert not bad, f"bad input accepted: {bad}"
    kept = [i for i in range(len(inputs)) if i not in written]
    assert_unchanged([before[i] for i in kept], [inputs[i] for i in kept])
    return True, result
