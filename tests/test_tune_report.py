"""The sweep report, rendered from synthetic trial records (no Ray)."""

import base64
import math
import re

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from minimind.tune.report import SweepSummary, TrialRecord, best_trial, write_report

PLOTS = ("objective_per_trial.png", "loss_curves.png", "parallel_coordinates.png", "param_importance.png")
DISTRIBUTIONS = {
    "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
    "optim.batch_size": CategoricalDistribution([8, 16, 32]),
}


def trial(trial_id, lr, batch_size, objective, status="finished", reason=None, is_baseline=False):
    """A trial whose training loss falls towards its objective's scale over 1.2M tokens."""
    final_loss = math.log(objective) if objective else 9.0
    curve = [{"tokens": step * 200_000, "loss": final_loss + 3.0 / step} for step in range(1, 7)]
    return TrialRecord(
        trial_id=trial_id,
        params={"optim.lr": lr, "optim.batch_size": batch_size},
        status=status,
        objective=objective,
        metrics={"val_perplexity": objective, "loss": final_loss} if objective else {},
        tokens=1_200_000,
        wall_seconds=65.0,
        curve=curve,
        reason=reason,
        is_baseline=is_baseline,
    )


def sweep_records():
    return [
        trial("t0", 3e-3, 16, 55.0, is_baseline=True),
        trial("t1", 1e-3, 8, 48.0),
        trial("t2", 3e-4, 32, 41.2),  # the best (mode min)
        trial("t3", 5e-3, 16, 60.3),
        trial("t4", 2e-4, 8, 44.7),
        trial("t5", 8e-3, 32, 70.1, status="pruned", reason="ASHA: 70.1 at 0.4M tokens, rung cutoff <65"),
        trial("t6", 9e-3, 32, None, status="failed", reason="loss became NaN/inf at step 3"),
    ]


def summary(mode="min", objective="val_perplexity", **fields):
    return SweepSummary(
        name="lr-batch", objective=objective, mode=mode, num_samples=7, distributions=DISTRIBUTIONS, **fields
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of the synthetic sweep: (sweep dir, report.md text, report.html text)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    md_path = write_report(sweep_dir, summary(best_configs=[("best.yaml", "pretrain")]), sweep_records())
    assert md_path == sweep_dir / "report.md"
    return sweep_dir, md_path.read_text(), (sweep_dir / "report.html").read_text()


def table_rows(markdown):
    """The trial table's data rows, each as its list of cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def test_best_trial_is_named_and_listed_first(report):
    _, markdown, _ = report
    assert "Best trial: `t2` (finished), `val_perplexity` = 41.2." in markdown
    rows = table_rows(markdown)
    assert rows[0][0] == "t2 (best)"
    assert [row[0] for row in rows] == ["t2 (best)", "t4", "t1", "t0 (baseline)", "t3", "t5", "t6"]
    assert rows[0][-3:] == ["1.2M", "1m 05s", ""]  # tokens, wall time, no reason


def test_gain_over_baseline_is_stated(report):
    _, markdown, _ = report
    expected = (55.0 - 41.2) / 55.0 * 100
    assert f"`val_perplexity` 41.2 vs baseline 55: {expected:.1f}% better (13.8 lower)" in markdown
    assert "--config" in markdown and "best.yaml" in markdown


def test_failed_trial_reason_is_in_its_row(report):
    _, markdown, _ = report
    failed = table_rows(markdown)[-1]
    assert failed[:3] == ["t6", "failed", "—"]
    assert failed[-1] == "loss became NaN/inf at step 3"


def test_plots_are_pngs_linked_from_markdown(report):
    sweep_dir, markdown, _ = report
    for name in PLOTS:
        assert (sweep_dir / "plots" / name).read_bytes().startswith(b"\x89PNG")
        assert f"(plots/{name})" in markdown
    assert "Not drawn" not in markdown


def test_html_is_self_contained(report):
    _, _, page = report
    assert 'src="http' not in page and "<script src" not in page and "<link" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PLOTS)
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "rung cutoff &lt;65" in page  # text is escaped
    assert "<code>t2</code>" in page


def test_max_mode_picks_the_highest_objective(tmp_path):
    records = [
        trial("t0", 3e-3, 16, 0.40, is_baseline=True),
        trial("t1", 1e-3, 8, 0.55),
        trial("t2", 3e-4, 32, 0.48),
    ]
    assert best_trial(records, "max").trial_id == "t1"
    markdown = write_report(tmp_path, summary(mode="max", objective="continuation_accuracy"), records).read_text()
    assert "Best trial: `t1`" in markdown
    assert f"0.55 vs baseline 0.4: {(0.55 - 0.40) / 0.40 * 100:.1f}% better (0.15 higher)" in markdown
    assert table_rows(markdown)[0][0] == "t1 (best)"


def test_only_failed_trials_still_give_a_report(tmp_path):
    for name in PLOTS:  # a stale plot from an earlier report must not survive
        (tmp_path / "plots").mkdir(exist_ok=True)
        (tmp_path / "plots" / name).write_bytes(b"\x89PNG old")
    records = [
        trial("t0", 3e-3, 16, None, status="failed", reason="out of memory", is_baseline=True),
        trial("t1", 1e-3, 8, None, status="failed", reason="loss became NaN/inf at step 3"),
    ]
    markdown = write_report(tmp_path, summary(), records).read_text()
    assert "No trial finished" in markdown
    # The baseline's loss before it failed is still drawn; nothing else can be.
    assert markdown.count("Not drawn:") == len(PLOTS) - 1
    assert [path.name for path in (tmp_path / "plots").iterdir()] == ["loss_curves.png"]
    assert (tmp_path / "plots" / "loss_curves.png").read_bytes() != b"\x89PNG old"


def test_missing_or_failed_baseline_is_reported(tmp_path):
    records = [record for record in sweep_records() if not record.is_baseline]
    assert "No baseline trial" in write_report(tmp_path / "a", summary(), records).read_text()
    records = sweep_records()
    records[0].status, records[0].objective, records[0].reason = "failed", None, "CUDA error"
    markdown = write_report(tmp_path / "b", summary(), records).read_text()
    assert "The baseline `t0` has no objective (failed (CUDA error))" in markdown
    # A baseline stopped early is compared with the best trial where it was stopped, not with the best's end.
    records = sweep_records()
    records[0].status, records[0].objective, records[0].evaluations = "pruned", 60.0, [(400_000, 60.0)]
    records[2].evaluations = [(200_000, 90.0), (400_000, 57.0), (1_200_000, 41.2)]
    markdown = write_report(tmp_path / "c", summary(), records).read_text()
    assert "`val_perplexity` 57 vs baseline 60: 5.0% better (3 lower)" in markdown  # (60 - 57) / 60
    assert "read at the baseline's last evaluation (400K tokens; it was pruned there)" in markdown


def test_best_trial_ignores_nan_and_prefers_finished():
    records = sweep_records()
    records[2].objective = float("nan")  # t2 was the best
    assert best_trial(records, "min").trial_id == "t4"
    assert best_trial([trial("t0", 1e-3, 8, float("nan"))], "min") is None
    pruned_better = [trial("t0", 1e-3, 8, 50.0), trial("t1", 1e-3, 8, 10.0, status="pruned")]
    assert best_trial(pruned_better, "min").trial_id == "t0"
    assert best_trial(pruned_better[1:], "min").trial_id == "t1"  # nothing finished: the best pruned stands in


def test_importance_leaves_out_a_trial_outside_the_space(tmp_path):
    records = sweep_records() + [trial("t7", 0.5, 12, 80.0)]  # an enqueued point beyond the searched range
    markdown = write_report(tmp_path, summary(), records).read_text()
    assert "importance of each varied parameter over 5 finished trials:" in markdown
    assert (tmp_path / "plots" / "param_importance.png").read_bytes().startswith(b"\x89PNG")
    # Four finished trials are too few to say which parameter matters.
    few = [record for record in records if record.trial_id != "t1"]
    markdown = write_report(tmp_path / "few", summary(), few).read_text()
    assert "parameter importance cannot be estimated yet: it needs at least 5 finished trials" in markdown


def test_rank_fidelity_per_rung_against_hand_computed_rho(tmp_path):
    from minimind.tune.fidelity import spearman

    # No ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)); one swapped pair of 4 is d^2 = 1 + 1: 1 - 12 / 60 = 0.8.
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Ties take the mean rank: y ranks 1, 2, 3.5, 5, 3.5 against 1..5 (both means 3); deviations -2, -1, 0.5, 2, 0.5
    # against -2..2 give covariance 4 + 1 + 0 + 2 + 1 = 8 and variances 10 and 9.5: rho = 8 / sqrt(95).
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None

    records = sweep_records()
    finals = {r.trial_id: r.objective for r in records if r.status == "finished"}  # t0..t4: 55, 48, 41.2, 60.3, 44.7
    order = sorted(finals, key=finals.get)
    for record in records:
        if record.trial_id in finals:
            place = order.index(record.trial_id)
            # At 400k tokens the final order already (values 100 + place); at 800k exactly reversed.
            record.evaluations = [(400_000, 100.0 + place), (800_000, 100.0 - place), (1_200_000, record.objective)]
    write_report(tmp_path, summary(rungs=[400_000, 800_000]), records)
    text = (tmp_path / "report.md").read_text()
    assert "| 400K | 5 | 1.00 |" in text and "| 800K | 5 | -1.00 |" in text
    assert "cannot be fully trusted in this sweep" in text and "800,000-token rung rho is -1.00" in text
    # Without enough finished trials it says so rather than printing a number.
    few = [r for r in records if r.trial_id in ("t0", "t1")]
    write_report(tmp_path / "few", summary(rungs=[400_000]), few)
    assert "Rank fidelity cannot be measured here: 2 trial(s)" in (tmp_path / "few" / "report.md").read_text()


def test_objective_against_duration_reads_each_length_within_a_tenth_and_names_epochs_when_given(tmp_path):
    records = sweep_records()[1:3]  # t1 (48.0) and t2 (41.2, ranked first)
    records[0].durations = [(395_000, 61.5), (1_190_000, 48.0)]  # padding leaves a run a little short
    records[1].durations = [(450_000, 50.25), (1_200_000, 41.2)]  # 12.5% past 400K: no reading there
    markdown = write_report(tmp_path, summary(durations=[400_000, 1_200_000]), records).read_text()
    assert "| trial | status | 400K tokens | 1.2M tokens |" in markdown
    assert "| t2 | finished | — | 41.2 |" in markdown and "| t1 | finished | 61.5 | 48 |" in markdown
    assert "Best reading: 41.2 (trial t2, 1.2M tokens). The shortest length within 1% of it: 1.2M tokens" in markdown
    records[0].durations[0] = (395_000, 41.5)  # 0.73% above the best, at a third of the tokens
    markdown = write_report(tmp_path / "near", summary(durations=[400_000, 1_200_000]), records).read_text()
    assert "within 1% of it: 400K tokens, 41.5 (trial t1), 33% of the longest length's tokens" in markdown
    # The best trial of a duration sweep is the one with the best reading at any length: t1's 41.5 at 400K tokens
    # beats t2's 41.2 only once t2's end is worse; the gain is read at that length, the baseline's too.
    records[1].durations = [(1_200_000, 41.8)]
    records.append(trial("t0", 3e-3, 16, 55.0, is_baseline=True))
    records[2].durations = [(400_000, 50.0), (1_200_000, 55.0)]
    assert best_trial(records, "min").trial_id == "t2"  # by the longest length alone
    assert best_trial(records, "min", [400_000, 1_200_000]).trial_id == "t1"
    markdown = write_report(tmp_path / "best", summary(durations=[400_000, 1_200_000]), records).read_text()
    assert "Best trial: `t1` (finished), `val_perplexity` = 41.5 at 400K tokens (the best length" in markdown
    assert "vs baseline 50: 17.0% better (8.5 lower). Both are read at 400K tokens." in markdown
    epochs = summary(durations=[400_000, 1_200_000], duration_epochs=[1, 3])
    markdown = write_report(tmp_path / "epochs", epochs, records).read_text()
    assert "| trial | status | 1 epoch (400K tokens) | 3 epochs (1.2M tokens) |" in markdown
