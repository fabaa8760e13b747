"""Parsing lm-eval output: the recorded choice follows the *scored* metric, and the chance rate is known."""

from evals.quality import group_samples, parse_results

CTX = "Q: which? Answer:"


def _sample(doc_id, lls, target, choices):
    return {"doc_id": doc_id, "doc": {"question": f"q{doc_id}"}, "target": target,
            "arguments": [[CTX, " " + c] for c in choices], "filtered_resps": [[ll, False] for ll in lls],
            "acc": float(max(range(len(lls)), key=lls.__getitem__) == target),
            "acc_norm": float(max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == target)}


def _out(task, metric, samples):
    return {"results": {task: {f"{metric},none": sum(s[metric] for s in samples) / len(samples),
                               f"{metric}_stderr,none": 0.1, "alias": task}},
            "higher_is_better": {task: {metric: True}}, "configs": {task: {"target_delimiter": " "}},
            "versions": {task: 1}, "n-shot": {task: 0}}


def test_acc_norm_choice_is_length_normalised_not_the_raw_argmax():
    # raw log-likelihoods favour the short choice B; per character the long choice A wins (what acc_norm scores)
    choices = ["a much longer answer text", "no", "maybe", "short"]
    lls = [-20.0, -6.0, -9.0, -10.0]
    samples = [_sample(0, lls, 0, choices), _sample(1, [-1.0, -5.0, -5.0, -5.0], 2, ["x", "yy", "zz", "ww"])]
    fields = parse_results("mc", _out("mc", "acc_norm", samples), samples)
    ex = fields["examples"]
    assert ex["0"]["choice"] == "A" and ex["0"]["target"] == "A"  # raw argmax would say B
    assert ex["0"]["margin"] > 0 and ex["1"]["choice"] == "A" and ex["1"]["target"] == "C"
    assert fields["chance"] == 0.25 and fields["items"]["0"] == [1.0, 1.0] and fields["binary"]
    raw = parse_results("mc", _out("mc", "acc", samples), samples)
    assert raw["examples"]["0"]["choice"] == "B"  # with acc as the metric, the raw argmax is the choice


def test_perplexity_task_has_no_chance_rate():
    samples = [{"doc_id": 0, "doc": {"text": "x"}, "bits_per_byte": [-10.0, 20], "filtered_resps": [-10.0]}]
    out = {"results": {"ppl": {"bits_per_byte,none": 0.72, "alias": "ppl"}},
           "higher_is_better": {"ppl": {"bits_per_byte": False}}, "configs": {"ppl": {}}}
    fields = parse_results("ppl", out, samples)
    assert fields["chance"] is None and not fields["binary"] and fields["higher_is_better"] is False


def test_a_group_task_collects_every_subtask_with_unique_ids():
    by_task = {"mmlu_pro_math": [{"doc_id": 0}, {"doc_id": 1}], "mmlu_pro_law": [{"doc_id": 0}]}
    ids = [s["doc_id"] for s in group_samples("mmlu_pro", by_task)]
    assert ids == ["mmlu_pro_law:0", "mmlu_pro_math:0", "mmlu_pro_math:1"]
    assert group_samples("mmlu_pro_law", by_task) == [{"doc_id": 0}]


def test_multi_filter_task_scores_one_filter_and_keeps_its_samples_only():
    """gsm8k-style: two filters, one sample per (doc, filter); the strict filter is the score, items unmixed."""
    samples = []
    for doc_id, (strict, flexible) in enumerate([(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)]):
        for filt, v in (("flexible-extract", flexible), ("strict-match", strict)):
            samples.append({"doc_id": doc_id, "doc": {"question": "q"}, "target": "4", "filter": filt,
                            "filtered_resps": ["4"], "arguments": [["q", {"until": ["\n"]}]], "exact_match": v})
    out = {"results": {"g": {"exact_match,flexible-extract": 2 / 3, "exact_match,strict-match": 1 / 3,
                             "exact_match_stderr,strict-match": 0.3, "alias": "g"}},
           "higher_is_better": {"g": {"exact_match": True}}, "configs": {"g": {}}}
    fields = parse_results("g", out, samples)
    assert fields["metric"] == "exact_match,strict-match" and fields["value"] == 1 / 3
    assert fields["items"] == {"0": [1.0, 1.0], "1": [0.0, 1.0], "2": [0.0, 1.0]} and fields["n_items"] == 3
    assert fields["stderr"] == 0.3 and fields["binary"]
