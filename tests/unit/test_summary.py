"""The one-sentence finding (service/report/summary.py)."""

from __future__ import annotations

from service.report.summary import TaskLine, finding_of_documents, finding_sentence


def test_sentence_groups_weaker_sides_then_symmetric_tasks_then_the_grade() -> None:
    lines = [TaskLine("smile", 0.62, 38.0, "left"), TaskLine("brow_raise", 0.551, 44.9, "left"),
             TaskLine("eye_closure", 0.05, 95.0, None)]
    caveat = "facesym-grader 0.1.0, trained on synthetic data; research use only"
    text = finding_sentence(lines, 1, ("III", caveat))
    assert text == ("Patient's left weaker: smile AI 0.62 (AS 38), brow raise AI 0.55 (AS 45); eye closure "
                    "symmetric (AI 0.05, AS 95). 1 instance not analysable. Grade (deep grader): "
                    f"House-Brackmann III — {caveat}.")


def test_nothing_scored_says_so_and_never_reads_as_symmetric() -> None:
    assert finding_sentence([], 2) == "No movement could be scored. 2 instances not analysable."
    weak = finding_sentence([TaskLine("smile", 0.9, 100.0, None, insufficient_activation=True)])
    assert weak == "Smile symmetric (AI 0.90, AS 100, insufficient activation)."


def test_documents_pick_the_worst_grade() -> None:
    model = {"model_version": "0.1.0", "trained_on": "synthetic"}
    docs = [{"quality": {"ok": True}, "grade": {"label": "II", **model}},
            {"quality": {"ok": True}, "grade": {"label": "IV", **model}},
            {"quality": {"ok": False}}]
    rows = [{"task": "smile", "asymmetry_index": 0.3, "asymmetry_score": 70.0, "weaker_side": "right"}]
    text = finding_of_documents(docs, rows)
    assert text is not None and text.startswith("Patient's right weaker: smile AI 0.30 (AS 70).")
    assert "1 instance not analysable" in text and "House-Brackmann IV" in text and "synthetic" in text
    assert finding_of_documents([], []) is None
