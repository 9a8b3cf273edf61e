"""The CPU profile benchmark attributes op time to this repository's source lines."""

from benchmarks.cpu_profile import NO_SOURCE, main


def test_cpu_profile_attributes_op_time_to_the_model_source(capsys):
    result = main(["--steps", "1", "--top", "5"])
    lines = result["lines"]  # "path:line" -> op ms per step
    assert result["op_ms"] > 0 and abs(sum(lines.values()) - result["op_ms"]) < 1e-6 * result["op_ms"] + 1e-9
    # The expert matmuls and the attention are where a training step spends time: both must be found by line.
    assert any(k.startswith("pallas_kernels/gmm/blocked.py:") and v > 0 for k, v in lines.items()), lines
    assert any(k.startswith("pallas_kernels/flash_attention/reference.py:") and v > 0 for k, v in lines.items())
    assert sum(v for k, v in lines.items() if k != NO_SOURCE) > 0.5 * result["op_ms"]
    assert result["page_faults"] >= 0
    out = capsys.readouterr().out
    assert "wall" in out and "minor page faults per step" in out
