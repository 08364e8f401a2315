"""`bench report`: one self-contained HTML file (tables, sample grids, reliability diagrams, OOD histograms,
ROC curves, robustness curves), checked as text and rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.evaluate import save_grid
from bench.metrics.ece import calibration_bins, reliability_diagram
from bench.metrics.ood import histogram, roc_figure
from bench.results.record import MetricEntry, Record
from bench.results.records import fingerprint, write_record
from bench.results.report import build_report

CHROMIUM = next((p for p in (os.environ.get("BENCH_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()), None)


def _record(suite: str, model: str, metrics: dict, seed: int = 0, data: str = "digits", protocol=None) -> Record:
    protocol = protocol or {"suite": suite, "scale": "tiny",
                            "data": {"name": data, "shape": [1, 8, 8], "n_classes": 10}}
    protocol["fingerprint"] = fingerprint(protocol)
    return Record(run_id=f"{suite}-{model}-{seed}", status="ok", suite=suite, suite_version="1", model=model,
                  family="x", data=data, scale="tiny", seed=seed, protocol=protocol, train={"seconds": 1.0},
                  env={"git_commit": "0123456789abc"},
                  metrics={k: MetricEntry(v, k != "ece", n=100) for k, v in metrics.items()})


def _robust_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.plot([0, 0.1, 0.2, 0.3], [95, 60, 20, 3], marker="o")
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Records of four suites with the artifacts `bench run` writes beside them, drawn by the project's own
    plotting functions (the robustness curve by plain matplotlib)."""
    d = tmp_path_factory.mktemp("results")
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for model in ("jem", "pixel_independent"):
        path = write_record(_record("hybrid", model, {"is": 2.5, "fid": 140.0}), d)
        grid = torch.randint(0, 256, (16, 1, 8, 8), generator=g, dtype=torch.uint8)
        save_grid(grid, path.with_suffix(".samples.png"))
    probs = torch.softmax(torch.randn(200, 10, generator=g), 1)
    labels = torch.randint(0, 10, (200,), generator=g)
    path = write_record(_record("calibration", "wrn", {"accuracy": 96.7, "ece": 28.7}), d)
    reliability_diagram(calibration_bins(probs, labels, 20), 28.7, "wrn on digits (20 bins)",
                        path.with_suffix(".reliability.png"))
    scores = {"in-distribution": rng.normal(1, 1, 300), "uniform": rng.normal(-1, 1, 300)}
    path = write_record(_record("ood", "jem", {"ood.log_px.uniform.auroc": 0.9}), d)
    histogram(scores, "jem: log_px", path.with_suffix(".ood_log_px.png"))
    roc_figure(scores, "jem: log_px", path.with_suffix(".roc_log_px.png"))
    path = write_record(_record("robustness", "wrn", {"accuracy": 96.7}), d)
    _robust_png(path.with_suffix(".robust.png"))
    return d


def test_report_is_self_contained(results, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("Sample grids", "Reliability diagrams", "OOD score histograms", "ROC curves",
                    "Robustness curves"):
        assert f"<h3>{heading}</h3>" in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r'<table[^>]*class="bench-table"', text)) == 4  # a table per (suite, data)
    # nothing to fetch: no external URL in any src, href or CSS url()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text) and "url(" not in text
    assert "No records here reproduce: cifar10" in text  # digits only: the published tables are listed as absent


def test_report_includes_published_tables_that_records_reproduce(tmp_path):
    protocol = {"data": {"name": "cifar10", "shape": [3, 32, 32], "n_classes": 10, "n_test": 10000},
                "scale": "paper"}
    write_record(_record("hybrid", "jem", {"accuracy": 91.0}, data="cifar10", protocol=protocol), tmp_path)
    text = build_report(str(tmp_path))
    assert "Published tables beside reproduced records" in text and "Table 1 (CIFAR10 hybrid" in text
    assert "91.00" in text and "92.9" in text


def test_report_refuses_bad_results_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "report.html"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no records" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install Debian's package (apt-get install chromium) or "
                                             "set BENCH_CHROMIUM to a Chromium binary")
def test_report_renders_in_headless_chromium(results, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                                                 "'bench[test]')")
    out = tmp_path / "report.html"
    out.write_text(build_report(str(results)))
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as p:
        # the system Chromium, never a downloaded one; --no-sandbox because CI containers run as root
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            requests = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(out.as_uri(), wait_until="load")
            state = page.evaluate("""() => ({
                tables: document.querySelectorAll('table.bench-table').length,
                rows: document.querySelectorAll('table.bench-table tbody tr').length,
                images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0,
                                                        w: i.naturalWidth, alt: i.alt})),
                headings: [...document.querySelectorAll('h2, h3')].map(h => h.textContent.trim()),
            })""")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert state["tables"] == 4 and state["rows"] >= 5
    assert len(state["images"]) == 6 and all(i["ok"] for i in state["images"]), state["images"]
    for heading in ("hybrid · data=digits", "Sample grids", "Reliability diagrams", "OOD score histograms",
                    "ROC curves", "Robustness curves"):
        assert heading in state["headings"]
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # offline: nothing fetched
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
