"""Each benchmark runs in quick mode into a temporary directory, writes its JSON and plots, and
reports what its physics says it must (no timing assertions: the numbers are the benchmarks' business)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from benchmarks import __main__ as cli
from benchmarks import accuracy, inversion, speed, throughput


def _written(tmp_path, name: str, pngs: list[str]) -> dict:
    data = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["quick"] is True
    for png in pngs:
        assert (tmp_path / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_accuracy_quick(tmp_path):
    out = accuracy.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    data = _written(tmp_path, "accuracy", ["accuracy_vs_nfe.png", "accuracy_gamma_heatmap.png"])
    assert len(data["rows"]) == len(out["rows"]) > 0
    assert all(0 < r["error"] < 100 for r in out["rows"])
    # the reference is far tighter than any solver's error, so the errors are the solvers'
    floor = max(c["reference_vs_100x_looser"] for c in out["reference"]["self_check"].values())
    assert floor < 1e-4 * min(r["error"] for r in out["rows"])
    # first-order DDIM: more steps, smaller error (on every problem and grid)
    for problem in accuracy.PROBLEMS:
        for grid in accuracy.SETTINGS:
            errs = [
                r["error"]
                for r in sorted(out["rows"], key=lambda r: r["steps"])
                if (r["problem"], r["grid"], r["method"]) == (problem, grid, "DDIM")
            ]
            assert errs == sorted(errs, reverse=True)
    for m in out["gamma_heatmaps"]:
        assert len(m["error"]) == len(m["gammas"]) and all(len(row) == len(m["steps"]) for row in m["error"])
    # BDIA over EDM's Heun: every backward choice and gamma at every N; a Heun backward step costs one more NFE
    edm = out["edm"]["rows"]
    assert {r["method"] for r in edm} == {"Euler", "Heun", *accuracy.EDM_METHODS}
    by = {(r["method"], r["gamma"], r["steps"]): r for r in edm}
    n = out["edm"]["steps"][-1]
    assert by[("BDIA-Heun, Heun back", 1.0, n)]["NFE"] > by[("BDIA-Heun, Euler back", 1.0, n)]["NFE"]
    assert all(0 < r["error"] < math.inf for r in edm)
    assert len(out["edict_long"]) == 2 and all(len(r["error"]) == len(r["steps"]) for r in out["edict_long"])


def test_trained_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import trained

    out = trained.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    _written(tmp_path, "trained", ["trained_accuracy.png"])
    assert {r["method"] for r in out["rows"]} == set(trained.methods(quick=True))
    assert all(0 < r["error"] < 1 and r["NFE"] <= r["NFE budget"] for r in out["rows"])
    # the reference is far closer to its cross-check than any solver is to the reference
    assert out["reference"]["distance of other fine solutions"]["DPM-Solver-2"] < 0.1 * min(
        r["error"] for r in out["rows"]
    )
    ddim = sorted((r["NFE"], r["error"]) for r in out["rows"] if r["method"] == "DDIM")
    assert ddim[0][1] > ddim[-1][1]
    # the published O-BELM gamma extrapolates on the last step of these grids; the bound keeps its root at 1
    for g in out["obelm_gamma"]:
        assert g["max published gamma"] > 2 and max(g["bounded, last 3"]) < 1.2


def test_inversion_quick(tmp_path):
    out = inversion.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    _written(tmp_path, "inversion", ["inversion_roundtrip.png", "inversion_latent.png", "inversion_gamma_heatmap.png"])

    def row(method, n, dtype):
        return next(r for r in out["rows"] if (r["method"], r["N"], r["dtype"]) == (method, n, dtype))

    n = max(r["N"] for r in out["rows"])
    eps64 = 2.220446049250313e-16
    # exact schemes round-trip to rounding in float64 (gamma = 1: no amplification); DDIM inversion does not
    for method in ("BDIA g=1", "EDICT p=0.93"):
        assert row(method, n, "float64")["noise->sample->invert"] < 100 * n * eps64
        assert row(method, n, "float64")["data->invert->sample"] < 100 * n * eps64
    assert row("DDIM inversion", n, "float64")["noise->sample->invert"] > 1e-3
    assert all(r["inverted latent std"] > 0 for r in out["rows"])
    assert set(out["gamma_maps"]) == {"float32", "float64"}


def test_speed_quick_through_the_command_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    assert cli.main(["speed", "--quick", "--results", str(tmp_path / "results"), "--img", str(tmp_path / "img")]) == 0
    data = _written(tmp_path, "speed", ["speed_summary.png"])
    assert "diffusers DDIMScheduler.step" in capsys.readouterr().out
    ops = {r["operation"]: r for r in data["per_step"]["rows"]}
    assert all(r["median us"] > 0 for r in ops.values()) and len(ops) == 10
    # our DDIM and diffusers' make the same update from the same eps (float32 rounding of O(1) values)
    assert data["per_step"]["ddim_vs_diffusers_maxabs"] < 1e-5
    assert {r["solver"] for r in data["end_to_end"]["rows"]} == {"DDIM", "BDIA-DDIM", "EDICT"}
    if "rows" in data["memory"]:
        assert all(math.isfinite(r["peak MB"]) for r in data["memory"]["rows"])
    for d in data["default_path"]:  # the default calls, flags untouched, at both pinned sizes and two step counts
        names = {r["per step"] for r in d["rows"]}
        assert names >= {"bdia.sample, BDIA(DDIM()), default flags", "bdia.invert of that sample, default flags"}
        assert names >= {speed.CHECKED, speed.VALIDATED}
        assert {r["walk"] for r in d["fixed"]} >= {"bdia.sample, BDIA(DDIM()), default flags", speed.VALIDATED}
        assert all(math.isfinite(r["fixed us"]) for r in d["fixed"])
    assert [d["shape"] for d in data["default_path"]] == [[4, 4, 64, 64], [1, 16, 128, 128]]
    assert len(data["compiled"]["rows"]) == 2


def test_quick_runs_never_write_the_committed_results(monkeypatch, tmp_path):
    import benchmarks

    monkeypatch.setattr(benchmarks, "RESULTS", tmp_path / "committed" / "results")
    monkeypatch.setattr(benchmarks, "IMG", tmp_path / "committed" / "img")
    results, img = benchmarks.outputs(True, None, None)
    assert benchmarks.RESULTS not in results.parents and results != benchmarks.RESULTS and img != benchmarks.IMG
    assert benchmarks.outputs(False, None, None) == (benchmarks.RESULTS, benchmarks.IMG)
    assert benchmarks.outputs(True, tmp_path / "r", tmp_path / "i") == (tmp_path / "r", tmp_path / "i")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speed_quick_on_cuda(tmp_path):
    pytest.importorskip("diffusers")
    out = speed.run(quick=True, results_dir=tmp_path, device="cuda")
    assert (tmp_path / "speed_cuda.json").exists() and out["memory"]["rows"]


def test_device_is_refused_for_cpu_only_benchmarks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["accuracy", "--quick", "--device", "cuda"])
    assert "CPU only" in capsys.readouterr().err


def test_diffusers_quick(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from benchmarks import diffusers as bench

    out = bench.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    _written(tmp_path, "diffusers", ["diffusers_speed.png"])
    assert all(r["median us/step"] > 0 for r in out["per_step"]["rows"]) and len(out["per_step"]["rows"]) == 4
    assert out["per_step"]["gamma0_vs_ddim_max_rel"] < 1e-5  # gamma = 0 is DDIMScheduler's walk, to rounding
    runs = {r["run"] for r in out["end_to_end"]["rows"]}
    assert {"pipeline, DDIMScheduler", "pipeline, BDIAScheduler gamma=1", "bdia.diffusers.sample gamma=1"} == runs
    assert {r["family"] for r in out["families"]} == {"SD 1.5", "SDXL", "SD3", "Flux"}
    for r in out["families"]:
        approximate = next(v for k, v in r.items() if k.endswith("inversion: image -> sample vs encode (float32)"))
        assert r["image -> invert -> sample vs encode (float64)"] < 1e-9, r  # exact but for float64 rounding
        assert approximate > 100 * r["image -> invert -> sample vs encode (float32)"], r  # the users' inversion
        # BDIA reconstructs what the VAE alone reconstructs: the walk adds nothing to the VAE's own loss
        assert r["PSNR BDIA (invert -> sample -> decode) dB"] == pytest.approx(
            r["PSNR VAE only (encode -> decode) dB"], abs=0.01
        )


def test_throughput_quick(tmp_path):
    pytest.importorskip("safetensors")
    out = throughput.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    data = _written(tmp_path, "throughput", [])
    assert [r["processes"] for r in data["rows"]] == [1, 2] and data["identical_files"] is True
    assert all(r["samples/s (loop)"] > 0 and 0 < r["writing share"] < 1 for r in out["rows"])
    assert all(run["samples"] == 12 and run["world_size"] == int(p) for p, rs in out["runs"].items() for run in rs)


def test_command_line_registry_and_errors(capsys):
    for name, module in cli.REGISTRY.items():
        assert module.startswith("benchmarks.") and name
    assert {"accuracy", "inversion", "speed"} <= set(cli.REGISTRY)
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-benchmark"])
    assert e.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_rounding_quick(tmp_path):
    from benchmarks import rounding

    out = rounding.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    rows = out["rows"]
    assert {r["default"] for r in rows} >= {"runs", "refused"}
    for r in rows:
        if r["denoiser"] != "mixture":
            continue
        if r["what"] == "round trip" and "EDM" not in r["case"]:
            # on smooth exact predictions the estimate predicts the round trip to within about an order of magnitude
            assert 1e-2 < r["ratio measured / predicted"] < 10, r
        if r["default"] == "refused":
            assert r["measured"] > 1e-3, r  # what is refused by default really is off by more than 0.1%


def test_the_gpu_command_runs_dry_on_the_cpu(tmp_path):
    """``python -m benchmarks gpu`` without CUDA: the dry mode (tiny sizes, CUDA tests collected, no graph capture)
    writes the one JSON with every section."""
    pytest.importorskip("diffusers")
    from benchmarks import gpu

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the command runs for real there")
    out = gpu.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    data = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert data["dry"] is True and out["tests"]["returncode"] == 0 and "collected" in out["tests"]["summary"]
    assert out["cuda_graph"] == {"skipped": "no CUDA device"}
    assert {r["per step"] for r in out["default_path"][0]["rows"]} >= {"bdia.sample, BDIA(DDIM()), default flags"}
    rows = {r["dtype"]: r for r in out["sd15_unet"]["rows"]}
    assert rows["float32"]["round trip (noise -> sample -> invert)"] < 1e-4
    assert gpu.sd15_unet_config()["block_out_channels"] == (320, 640, 1280, 1280)


def test_the_default_path_is_timed_as_users_call_it(monkeypatch):
    """The speed benchmark runs inside ``torch.inference_mode``; its default-path candidates must not: a user's call
    runs with autograd in its default mode, and returns states whose latents carry version counters (what lets the
    inversion that follows skip re-validating them)."""
    pytest.importorskip("diffusers")
    import bdia

    seen = []
    real = bdia.invert

    def invert(model, x, *args, **kwargs):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), x.x.is_inference()))
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(bdia, "invert", invert)
    with torch.inference_mode():
        speed.default_path(repeats=1, shape=(1, 2, 4, 4), steps=(3, 5))
    assert seen and set(seen) == {(False, True, False)}


def test_interleaved_rounds_vary_each_candidates_predecessor():
    """A candidate's time depends on what ran before it (caches, heap): over the rounds each one must follow every
    other, so that no neighbour's effect is charged to it alone; and each round times each candidate once."""
    from benchmarks import interleaved

    calls: list[str] = []
    names = [f"c{i}" for i in range(6)]
    times = interleaved({n: (lambda n=n: calls.append(n)) for n in names}, repeats=60, inner=2)
    assert all(len(times[n]) == 60 for n in names)
    rounds = [calls[i : i + 12 : 2] for i in range(0, len(calls), 12)]
    assert all(sorted(r) == names for r in rounds)
    before = {n: {r[r.index(n) - 1] for r in rounds if r.index(n) > 0} for n in names}
    assert all(before[n] == set(names) - {n} for n in names), before
    # seeded: the same order again
    again: list[str] = []
    interleaved({n: (lambda n=n: again.append(n)) for n in names}, repeats=60, inner=2)
    assert again == calls


def test_the_validated_hand_loop_checks_each_output_as_a_walk_does():
    """The floor with every check calls the network through Model.output: a network whose output would broadcast
    silently in the bare loop is named there, as a walk names it; with a good network both loops give the same bits."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = speed.SD.timesteps(5, "leading", steps_offset=1).tolist()
    good, bad = torch.randn_like(x), torch.randn(2, 1, 4, 4)
    assert torch.equal(
        speed._hand_loop(x, lambda z, t: good, grid, x, validated=True)(),
        speed._hand_loop(x, lambda z, t: good, grid, x)(),
    )
    assert speed._hand_loop(x, lambda z, t: bad, grid, x)().shape == x.shape  # (broadcast: nothing noticed)
    with pytest.raises(ValueError, match="net output must be a tensor shaped like x"):
        speed._hand_loop(x, lambda z, t: bad, grid, x, validated=True)()
