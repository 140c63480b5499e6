"""The measuring scripts run end to end at tiny sizes and write the JSON their reports rely on (no timing asserted)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffedit import precision

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path, name: str, *flags) -> dict:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: a busy co-tenant makes OpenMP barriers spin
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *flags, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def numbers(tree):
    """Every number in a JSON tree."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    r = run_script(tmp_path, "gpu_check", "--dry-run")
    assert {"matmul", "edits", "diffusers", "agreement", "memory", "unet_flops_per_row"} <= set(r)
    for dtype in ("float16", "bfloat16"):
        eager = r["edits"][dtype]["eager"]
        assert {"time_s", "unet_rows", "s_per_row", "fraction_of_matmul", "fraction_of_fp16_matmul"} <= set(eager)
        assert eager["unet_rows"] == 2 * r["n"] + 3 * round(0.8 * r["steps"])  # the paper-faithful edit's rows
        assert {"mask_iou", "psnr_db"} <= set(r["agreement"][f"{dtype}_vs_float32"])
    assert r["diffusers"]["float16"]["unet_rows"] == 4 * r["n"] + 4 * int(0.8 * r["steps"])
    assert "eager" in r["diffusers"]["speedup"] and "peak_above_weights_mb" in r["memory"]
    assert all(math.isfinite(x) for x in numbers(r))


@pytest.mark.skipif(not precision.cpu_has_native_bf16(),
                    reason="the script compares bf16 with fp32 edits; bf16 is emulated on this CPU, too slow for the "
                           "suite even at --quick sizes")
def test_precision_agreement_quick_writes_both_parts_and_verdicts(tmp_path):
    r = run_script(tmp_path, "precision_agreement", "--quick")
    for part in ("toy", "sd"):
        assert {"mask_iou", "mask_iou_min", "psnr_db", "psnr_min_db"} <= set(r[part]["agreement"])
    assert set(r["toy"]["diffedit_metrics"]) == {"float32", "bfloat16"}
    assert set(r["toy"]["bf16_minus_fp32"]) == {"success", "iou", "bg_psnr"}
    assert r["toy"]["seed"] == 4243 and len(r["checks"]) == 7
    assert all(math.isfinite(x) for x in numbers(r))


def test_benchmark_quick_mode_runs_the_cpus_native_dtypes(tmp_path):
    if not (ROOT / "diffedit" / "toy" / "toy.safetensors").is_file():
        pytest.skip("no toy weights")
    native = precision.native_dtypes("cpu")  # the default: bf16 only where native (emulated, it is far slower)
    r = run_script(tmp_path, "benchmark", "--cases", "toy", "--repeats", "1", "--steps", "4", "--device", "cpu",
                   "--matmul-n", "256")
    assert r["dtypes"] == native and r["headline_case"] == "toy" and r["matmul"]["n"] == 256
    for key in ("speedup_default", "speedup_matched", "unet_flop_rate_fraction"):
        assert math.isfinite(r[key]), key
    assert (r["speedup_matched_bf16"] is not None) == ("bfloat16" in native)
    for d in native:
        runs = r["cases"]["toy"]["dtypes"][d]["runs"].values()
        assert all(run["unet"]["rows"] == run["unet"]["expected_rows"] for run in runs)
        assert {run["unet"]["rows"] for run in runs} == {29, 32, 52}  # n 10, 3 decoding steps: 2n + 3k, 2n + 4k, 4n + 4k
    assert all(math.isfinite(x) for x in numbers(r))


def test_bench_sdxl_dry_run_races_both_unets_on_shared_tensors_in_the_cpus_native_dtypes(tmp_path):
    r = run_script(tmp_path, "bench_sdxl", "--preset", "tiny-sdxl", "--sides", "8", "--repeats", "1")
    assert r["edit_rows"]["paper"]["rows"] == r["edit_rows"]["paper"]["expected_rows"] == 140
    assert r["edit_rows"]["library_defaults"]["rows"] == 125
    assert sorted(r["dtypes"]) == sorted(precision.native_dtypes("cpu"))
    for d, res in r["dtypes"].items():
        assert res["shared_tensors"]
        side = res["sides"]["8"]
        assert side["ours"]["flops_counted_on_cpu"] == side["diffusers"]["flops_counted_on_cpu"] > 0
        assert side["flops"] == 2 * r["row_flops_batch1"]["8"] >= side["ours"]["flops_counted_on_cpu"]
        assert side["relative_difference"] < (0.05 if d == "bfloat16" else 1e-4)
    assert all(math.isfinite(x) for x in numbers(r))


def test_cpu_memory_runs_an_sdxl_edit(tmp_path):
    r = run_script(tmp_path, "cpu_memory", "--preset", "tiny-sdxl", "--size", "64", "--steps", "2")
    assert r["unet_rows"] == 2 * 10 + 3 * round(0.8 * 2)
    assert r["largest_unet_call_rows"] == 10  # a mask-pass call: n rows under one text
    assert r["peak_rss_mib"] >= r["rss_with_weights_mib"] > 0


def test_mask_anatomy_finds_the_shipped_models_map_on_the_changed_cells(tmp_path):
    if not (ROOT / "diffedit" / "toy" / "toy.safetensors").is_file():
        pytest.skip("no toy weights")
    r = run_script(tmp_path, "mask_anatomy", "--n", "6", "--seed", "12345", "--strength", "0.5,0.7", "--noises", "2",
                   "--normalization", "quantile,minmax")
    assert [(x["normalization"], x["strength"], x["n"]) for x in r["results"]] == [
        ("quantile", 0.5, 2), ("quantile", 0.7, 2), ("minmax", 0.5, 2), ("minmax", 0.7, 2)] and r["world"] == "v1"
    for x in r["results"]:
        every = x["by_kind"]["all"]
        assert every["count"] == 6 == sum(k["count"] for name, k in x["by_kind"].items() if name != "all")
        assert every["d_changed"] > 2 * every["d_outside"]  # D is on the edit, not spread over the image
        assert 0 < every["iou"] <= 1 and 0 < every["iou_footprint"] <= 1
        for kind in ("colour", "background"):  # their footprint is the changed pixels: no rest of the object
            if kind in x["by_kind"]:
                assert x["by_kind"][kind]["d_rest_of_object"] is None
    assert all(math.isfinite(x) for x in numbers(r))


def test_mask_anatomy_refuses_the_training_seed_and_bad_lists():
    for flags, message in ((["--seed", "0"], "training seed"),
                           (["--noises", "ten"], "--noises: 'ten' is not an integer"),
                           (["--strength", "0"], "strength must be in (0, 1]"),
                           (["--normalization", "max"],
                            "--normalization must be one of quantile, clamp, minmax, clamp-mean, got 'max'")):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mask_anatomy.py"), "--n", "1", *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_sd3_roundtrip_dry_run_measures_both_schedules_drift(tmp_path):
    r = run_script(tmp_path, "sd3_roundtrip", "--dry-run")
    assert len(r["models"]) == 2  # the flow model's Euler inversion and DDIM's, side by side
    assert all(set(m["errors"]["r=1"]) == {"4", "8"} for m in r["models"].values())
    values = numbers(r)
    assert values and all(math.isfinite(v) for v in values)


def test_flux_memory_tiny_stores_float8_and_estimates_both_modes(tmp_path):
    r = run_script(tmp_path, "flux_memory", "--preset", "tiny-flux", "--text-tokens", "8", "--dtype", "float32")
    f8, wide = r["measured"]["float8"], r["measured"]["float32"]
    assert f8["float8_parameters"] > 0 and wide["float8_parameters"] == 0  # Linear weights kept float8 only there
    assert wide["resident_parameter_mib"] <= f8["resident_parameter_mib"] + 1  # its blocks are made one at a time
    assert r["tokens"] == {"measured": 8 * 8 + 8, "1024": 64 * 64 + 512}
    est = r["estimate_1024px_mib"]
    assert est["float8"]["transformer_weights_mib"] < est["float32"]["transformer_weights_mib"]
    assert all(e["peak_rss_without_t5_mib"] < e["peak_rss_mib"] for e in est.values())
    values = numbers(r)
    assert values and all(math.isfinite(v) for v in values)


def test_bench_flux_dry_run_races_both_transformers_and_reads_the_default_edits_rows(tmp_path):
    r = run_script(tmp_path, "bench_flux", "--preset", "tiny-flux")
    rows = r["edit_rows"]  # n 10, ratio 0.7: mask 2n, then round(0.7 x steps) encoding and decoding rows
    assert (rows["flux-dev"]["settings"]["steps"], rows["flux-dev"]["settings"]["guidance"]) == (28, 3.5)
    assert rows["flux-dev"]["rows"] == 20 + 20 + 20 and rows["flux-dev, true CFG 2"]["decoding"] == 40
    assert rows["flux-schnell"]["rows"] == 20 + 3 + 3
    assert r["row_flops_full_depth"]["flux-dev (512 text tokens)"]["128x128"] > 7e13  # 57 blocks at 4096 + 512 tokens
    assert sorted(r["dtypes"]) == sorted(precision.native_dtypes("cpu"))
    for d, res in r["dtypes"].items():
        side = res["sides"]["8"]
        assert side["ours"]["flops_counted_on_cpu"] == side["diffusers"]["flops_counted_on_cpu"] > 0
        assert side["flops"] >= side["ours"]["flops_counted_on_cpu"] and side["full_over_raced_flops"] == 1
        if d == "float32":
            assert side["relative_difference"] < 1e-4
    assert all(math.isfinite(x) for x in numbers(r))


def test_flux_roundtrip_dry_run_measures_each_flow_models_drift_and_the_encoding_guidance(tmp_path):
    r = run_script(tmp_path, "flux_roundtrip", "--dry-run")
    assert len(r["unguided"]) == 3  # FLUX.1-dev, schnell and SD3 side by side
    assert all(set(m["errors"]["r=1"]) == {"2", "4"} for m in r["unguided"].values())
    assert set(r["encoding_guidance"]["errors"]) == {"encode g=1", "encode g=3.5"}
    values = numbers(r)
    assert values and all(math.isfinite(v) for v in values)


def test_bench_diffusers_api_dry_run_counts_rows_and_encodes_of_the_three_calls(tmp_path):
    r = run_script(tmp_path, "bench_diffusers_api", "--dry-run")
    fp32 = r["dtypes"]["float32"]
    assert fp32["parity"]["mask_equal"] and fp32["parity"]["image_max_diff_255"] <= 2
    # diffusers' mask pass runs CFG rows and encodes the image n times; ours neither
    assert fp32["ours"]["total"]["unet_rows"] < fp32["diffusers"]["total"]["unet_rows"]
    assert fp32["ours"]["total"]["vae_encode_rows"] == 1 < fp32["diffusers"]["total"]["vae_encode_rows"]
    values = numbers(r)
    assert values and all(math.isfinite(v) for v in values)


def test_low_memory_dry_run_measures_both_modes_and_they_give_the_same_bits(tmp_path):
    r = run_script(tmp_path, "low_memory", "--preset", "tiny-sd3", "--px", "32", "--dtype", "float32")
    assert r["same_bits"] and r["both_loaded"]["finite"]
    assert r["both_loaded"]["swaps"] == [] and r["low_memory"]["swaps"] == [
        "low-memory mode: T5 freed, the transformer loaded"]
    assert "low-memory mode" in r["low_memory"]["memory_line"] and r["file_dtype"] == "float16"
    assert set(r["anonymous_at_transformer_calls_gib"]) == {"both_loaded", "low_memory"}
    assert all(m["rss_at_t5_calls_gib"] and m["rss_at_transformer_calls_gib"] for m in (r["both_loaded"],
                                                                                       r["low_memory"]))
    assert all(math.isfinite(x) for x in numbers(r))
