"""memorize/experiments/plots.py: each plot is a PNG of the size its figure asks for, from a small summary."""

import struct

import pytest

from memk.memorize.experiments import plots
from memk.memorize.experiments.capacity import summarize as capacity_summary
from memk.memorize.experiments.generalization_summary import summarize as generalization_summary

DPI = 120  # plots._save's


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which the signature is followed by."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def capacity_row(name, params, n, dataset_bits, mem, precision="float32", gain=0.01):
    return dict(run_id=f"{name}-{n}-{precision}", model={"n_layer": 1}, model_name=name, parameters=params,
                n_sequences=n, precision=precision, seed=0, dataset_bits=dataset_bits, memorized_bits=mem,
                memorized_bits_final=mem, fraction_memorized=mem / dataset_bits, model_bits_per_sequence=1.0, steps=10,
                stop_reason="saturated", saturation_gain=gain, saturated=gain < 0.02, final_loss=0.1,
                train_seconds=1.0, bits_curve=[[10, mem]], train_config={})


ROWS = [capacity_row("a", 100, 1, 200, 190), capacity_row("a", 100, 4, 800, 360, gain=0.1),
        capacity_row("b", 200, 2, 400, 395), capacity_row("b", 200, 8, 1600, 720)]


@pytest.mark.parametrize("precisions", [["float32"], ["float32", "bfloat16"]])
def test_capacity_curves_get_a_panel_per_precision(tmp_path, precisions):
    rows = [{**r, "precision": p} for p in precisions for r in ROWS]
    path = tmp_path / "curves.png"
    plots.plot_capacity_curves(capacity_summary(rows), path)
    assert png_size(path) == (round(6.5 * DPI) * len(precisions), round(4.8 * DPI))


def test_capacity_against_parameters_is_one_panel(tmp_path):
    path = tmp_path / "params.png"
    plots.plot_capacity_vs_params(capacity_summary(ROWS), path)
    assert png_size(path) == (round(6.5 * DPI), round(4.8 * DPI))


def generalization_row(run_id, role, name, n, ratio, heldout, unintended, f1, exact=None):
    row = {
        "run_id": run_id, "role": role, "model_name": name, "parameters": 100, "capacity_bits": 1000.0,
        "n_sequences": n, "size_factor": ratio, "dataset_bits": 1000.0 * ratio, "dataset_over_capacity": ratio,
        "capacity_over_dataset": 1 / ratio, "train_bits_per_token": 1.0, "heldout_bits_per_token": heldout,
        "total_memorization_bits": 500.0, "unintended_bits": unintended, "unintended_reference_bits": unintended,
        "generalization_bits": 500.0 - unintended, "f1": f1, "auc": f1, "steps": 10, "stop_reason": "plateau",
        "model": {}, "attack": {}, "train_seconds": 1.0, "train_config": {},
    }
    if exact is not None:
        row["unintended_exact_bits"] = exact
    return row


@pytest.mark.parametrize("exact", [None, 1.0])
def test_generalization_writes_three_plots_and_the_reference_check_where_the_generator_is_known(tmp_path, exact):
    rows = [generalization_row(f"a{i}", "sweep", "A", 10 * 2**i, r, 5.0 - i, 30.0 - 5 * i, f1, exact)
            for i, (r, f1) in enumerate([(0.25, 1.0), (0.5, 0.95), (1.0, 0.8), (2.0, 0.6), (4.0, 0.5)])]
    rows.append(generalization_row("c1", "check", "C", 30, 1.5, 2.0, 5.0, 0.7, exact))
    prediction = {"law": None, "made_at": "t", "predictions": [
        {"run_id": "c1", "model_name": "C", "n_sequences": 30, "capacity_over_dataset": 1 / 1.5, "predicted_f1": 0.75}]}
    paths = plots.plot_generalization(generalization_summary(rows, prediction), tmp_path)
    sizes = {p.name: png_size(p) for p in paths}
    expected = {"memorization.png": (12 * DPI, round(4.6 * DPI)), "double_descent.png": (7 * DPI, round(4.8 * DPI)),
                "membership.png": (7 * DPI, round(4.8 * DPI))}
    if exact is not None:
        expected["reference_check.png"] = (round(5.5 * DPI), 5 * DPI)
    assert sizes == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
