"""The comparison report: mean/std over seeds, improvement row, Markdown, JSON and plots."""
from __future__ import annotations

import json

import pytest

from alphafuse_dist.evaluate.report import build_report, to_markdown, write_report


def _metrics(method, seed, ndcg, hr, tail_ndcg):
    return {"method": method, "seed": seed, "split": "test", "protocol": "full", "history_masked": False,
            "similarity": "cosine", "items": 100,
            "metrics": {"overall": {"NDCG@10": ndcg, "HR@10": hr, "users": 50},
                        "tail": {"NDCG@10": tail_ndcg, "HR@10": hr / 2, "users": 20}}}


def _history(loss0):
    return {"epochs": [{"epoch": 1, "loss": loss0, "val_NDCG@10": 0.01}, {"epoch": 2, "loss": loss0 / 2,
                                                                          "val_NDCG@10": 0.02}]}


@pytest.fixture
def runs():
    return [(_metrics("alphafuse", 1, 0.10, 0.20, 0.05), _history(5.0)),
            (_metrics("alphafuse", 2, 0.12, 0.22, 0.07), _history(5.1)),
            (_metrics("sasrec_id", 1, 0.08, 0.21, 0.02), _history(6.0)),
            (_metrics("sasrec_id", 2, 0.10, 0.23, 0.02), None),
            (_metrics("morec", 1, 0.05, 0.10, 0.06), None)]


def test_mean_std_and_improvement_over_the_best_baseline(runs):
    r = build_report(runs)
    assert r["methods"] == ["morec", "sasrec_id", "alphafuse"]  # baselines first
    mean, std = r["groups"]["overall"]["alphafuse"]["NDCG@10"]
    assert mean == pytest.approx(0.11) and std == pytest.approx(0.0141421356)  # sample std of 0.10, 0.12
    assert r["groups"]["overall"]["morec"]["NDCG@10"] == [0.05, 0.0]  # one seed: std 0
    imp = r["improvement"]["overall"]["NDCG@10"]
    assert imp["best_baseline"] == "sasrec_id" and imp["relative"] == pytest.approx(0.11 / 0.09 - 1)
    # per metric and group, the best baseline may differ: on the tail it is morec
    assert r["improvement"]["tail"]["NDCG@10"]["best_baseline"] == "morec"
    assert r["improvement"]["overall"]["HR@10"]["relative"] == pytest.approx(0.21 / 0.22 - 1)
    assert r["users"] == {"overall": 50, "tail": 20}


def test_markdown_json_and_plots_are_written(runs, tmp_path):
    r = build_report(runs)
    md = to_markdown(r, "ML test")
    # columns HR before NDCG at each k; the best mean of a column in bold
    assert "| method | HR@10 | NDCG@10 |" in md
    assert "| alphafuse | 0.2100 ± 0.0141 | **0.1100 ± 0.0141** |" in md
    assert "| sasrec_id | **0.2200 ± 0.0141** | 0.0900 ± 0.0141 |" in md
    assert "| improv. of alphafuse over the best baseline | -4.5% (vs sasrec_id) | +22.2% (vs sasrec_id) |" in md
    assert "## tail (20 test cases), full ranking, unfiltered (seen items ranked too)" in md
    paths = write_report(r, tmp_path / "report", title="ML test")
    assert sorted(p.name for p in paths) == ["metrics_by_group.png", "report.json", "report.md",
                                             "training_curves.png"]
    for p in paths:
        assert p.stat().st_size > 0
    assert (tmp_path / "report" / "metrics_by_group.png").read_bytes()[:4] == b"\x89PNG"
    again = json.loads((tmp_path / "report" / "report.json").read_text())
    assert again["improvement"]["overall"]["NDCG@10"]["best_baseline"] == "sasrec_id"
    assert len(again["runs"]) == 5


def test_ablation_rows_of_the_proposed_method_are_not_baselines(runs):
    # an ablation row of alphafuse better than every baseline: the improvement row still compares
    # alphafuse with the baselines only, and the row keeps its own line in the tables
    r = build_report([*runs, (_metrics("alphafuse [threshold]", 1, 0.20, 0.30, 0.10), None)])
    assert r["groups"]["overall"]["alphafuse [threshold]"]["NDCG@10"] == [0.20, 0.0]
    imp = r["improvement"]["overall"]["NDCG@10"]
    assert imp["best_baseline"] == "sasrec_id" and imp["relative"] == pytest.approx(0.11 / 0.09 - 1)
    assert r["improvement"]["tail"]["NDCG@10"]["best_baseline"] == "morec"


def test_single_method_has_no_improvement_row(runs):
    r = build_report(runs[:2])
    assert r["improvement"] == {} and "improv." not in to_markdown(r)
    # one seed per method: the mean alone, no "± 0.0000" pretending to be a spread
    assert "| morec | 0.1000 | 0.0500 |" in to_markdown(build_report(runs[4:]))
    with pytest.raises(ValueError, match="no runs"):
        build_report([])


def test_an_empty_group_is_named_not_tabulated(runs, tmp_path):
    for metrics, _ in runs:  # no target was never seen in training: the group has 0 test cases
        metrics["metrics"]["never_seen"] = {"NDCG@10": 0.0, "HR@10": 0.0, "users": 0}
    md = to_markdown(build_report(runs), "ML test")
    section = md.split("## never_seen (0 test cases), full ranking, unfiltered (seen items ranked too)")[1]
    assert section.strip() == "No test case falls in this group."
    assert "## tail (20 test cases)" in md and "| alphafuse |" in md.split("## never_seen")[0]
    write_report(build_report(runs), tmp_path / "r")  # the plot leaves the empty group out without error


def _two_protocols(method, seed, filtered_ndcg, unfiltered_ndcg, share):
    def table(ndcg):
        return {"overall": {"NDCG@10": ndcg, "PopShare@10": share, "Coverage@10": 0.5, "users": 50}}

    by_protocol = {"filtered": table(filtered_ndcg), "unfiltered": table(unfiltered_ndcg)}
    return {"method": method, "seed": seed, "split": "test", "protocol": "full", "history_masked": True,
            "ranking": "filtered", "items": 100, "metrics": by_protocol["filtered"], "by_protocol": by_protocol}


def test_both_protocols_tabulated_lead_first_and_list_metrics_never_improvements():
    runs = [(_two_protocols("alphafuse", 1, 0.20, 0.10, 0.9), None),
            (_two_protocols("sasrec_id", 1, 0.18, 0.12, 0.3), None)]
    r = build_report(runs)
    assert r["protocols"] == ["filtered", "unfiltered"]
    assert r["by_protocol"]["unfiltered"]["groups"]["overall"]["sasrec_id"]["NDCG@10"] == [0.12, 0.0]
    assert set(r["improvement"]["overall"]) == {"NDCG@10"}  # a head share is no gain or loss
    md = to_markdown(r, "two")
    filtered = md.index("## overall (50 test cases), full ranking, filtered (the user's seen items removed)")
    unfiltered = md.index("## overall (50 test cases), full ranking, unfiltered (seen items ranked too)")
    assert filtered < unfiltered
    assert "| method | NDCG@10 | PopShare@10 | Coverage@10 |" in md
    assert "| alphafuse | **0.2000** | 0.9000 | 0.5000 |" in md  # the larger head share is not bold
    assert "| improv. of alphafuse over the best baseline | +11.1% (vs sasrec_id) |  |  |" in md
    assert "| improv. of alphafuse over the best baseline | -16.7% (vs sasrec_id) |  |  |" in md


def test_each_method_keeps_one_colour_and_report_md_links_plots_and_defines_groups(runs, tmp_path):
    from matplotlib.colors import to_rgb

    from alphafuse_dist.config import METHODS
    from alphafuse_dist.evaluate.report import method_colour

    colours = [to_rgb(method_colour(m)) for m in METHODS]
    assert len(set(colours)) == len(METHODS)  # 7 methods, 7 distinct colours
    # a method's colour does not depend on which or how many methods are compared
    assert method_colour("morec", ["morec", "alphafuse"]) == method_colour("morec", list(METHODS)) == "tab:green"
    write_report(build_report(runs), tmp_path / "report", title="ML test")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "![metrics_by_group](metrics_by_group.png)" in md and "![training_curves](training_curves.png)" in md
    assert "- **tail**: test cases whose target is not a head item" in md
    assert "MRR@k the mean of 1/(r + 1), both counting 0 where r >= k" in md


def test_terminal_table_fits_100_columns_and_says_what_it_counts():
    from alphafuse_dist.evaluate.stage import format_table

    groups = {"overall": 671, "tail": 195, "head": 476}
    metrics = {"metrics": {g: {**{f"{m}@{k}": 0.0123 for m in ("HR", "NDCG", "MRR") for k in (10, 20)}, "users": n}
                           for g, n in groups.items()}}
    table = format_table([("whitenrec (seed 22)", metrics), ("alphafuse (seed 22)", metrics)], ks=(10, 20))
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].startswith("protocol: full ranking")
    assert lines[1].split() == ["overall", "(671)", "tail", "(195)", "head", "(476)"]
    assert lines[4].split() == ["whitenrec", "(seed", "22)"] + ["0.0123"] * 10
    assert "In brackets: test cases (one per evaluated user)" in table
