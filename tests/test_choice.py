"""Multiple-choice evaluation by log-likelihood (geomkit.choice) and ``--eval-data``."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _tiny_model_dir

import geomkit
from geomkit.choice import Question, accuracy, read_questions
from geomkit.cli import main
from geomkit.config import ConfigError


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_accuracy_picks_the_most_likely_choice(tmp_path):
    import transformers

    directory = _tiny_model_dir(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    questions = [
        Question("w1 w2 w3", ("w4", "w5 w6", "w7"), 0),
        Question("w9", ("w10", "w11"), 1),
        Question("w12 w13", ("w14 w15 w16", "w17"), 1),
    ]

    def loglik(context: str, continuation: str) -> float:  # one at a time, no padding
        left = tokenizer(context)["input_ids"]
        ids = left + tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        return sum(float(logp[i - 1, ids[i]]) for i in range(len(left), len(ids)))

    right = 0
    for q in questions:
        values = [loglik(q.prompt(), c) for c in q.choices]
        right += values.index(max(values)) == q.answer
    model.train()
    assert accuracy(model, tokenizer, questions, batch_size=2) == right / 3
    assert model.training  # mode restored
    # the choice each question gets is the argmax: answering it makes accuracy 1
    best = [
        Question(
            q.question,
            q.choices,
            max(range(len(q.choices)), key=lambda i, q=q: loglik(q.prompt(), q.choices[i])),
        )
        for q in questions
    ]
    assert accuracy(model, tokenizer, best) == 1.0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": 3, "choices": ["a", "b"], "answer": 0}, "question=3"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "choices="),
        (
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            r"answer=2: expected an index in \[0, 1\]",
        ),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer=True"),
    ],
)
def test_malformed_questions_name_the_line(tmp_path, row, message):
    path = _write(
        tmp_path / "q.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": 1}, row]
    )
    with pytest.raises(ConfigError, match=rf"q.jsonl:2: invalid {message}"):
        read_questions(path)
    with pytest.raises(ConfigError, match="holds no question"):
        read_questions(_write(tmp_path / "empty.jsonl", []))


def local_model(tmp_path, answers=(0,) * 8):
    """A tiny local model, forget and retain corpora and a question file (one question per
    entry of ``answers``, that index right): paths of the four."""
    directory = _tiny_model_dir(tmp_path)
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text(" ".join(f"w{(3 * j) % 40}" for j in range(60)))
    retain.write_text(" ".join(f"w{j % 40}" for j in range(100)))
    rows = [
        {"question": f"w{i}", "choices": [f"w{i + 1}", f"w{i + 2}"], "answer": answer}
        for i, answer in enumerate(answers)
    ]
    return directory, forget, retain, _write(tmp_path / "probe.jsonl", rows)


def test_eval_data_is_scored_at_every_evaluation(tmp_path):
    directory, forget, retain, questions = local_model(tmp_path)
    out = tmp_path / "runs"
    argv = [
        "run",
        "--model",
        str(directory),
        "--forget-data",
        str(forget),
        "--retain-data",
        str(retain),
    ]
    argv += ["--out", str(out), "--strategy", "sago", "--steps", "4", "--eval-every", "2"]
    argv += ["--batch-size", "2", "--chunk-length", "16", "--no-report"]
    assert main([*argv, "--eval-data", f"forget={questions}", f"probe={questions}"]) == 0
    metrics = json.loads((out / "graddiff-sago-seed0" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert set(metrics["before"]) == {"forget_acc", "probe_acc"}
    assert metrics["before"]["forget_acc"] == metrics["before"]["probe_acc"]
    ds = geomkit.open_run(out / "graddiff-sago-seed0")  # forget_acc has a store variable
    assert ds["forget_acc"].values.tolist() == [metrics["before"]["forget_acc"]] + [
        h["forget_acc"] for h in metrics["history"]
    ]
    assert main([*argv, "--eval-data", "forget"]) == 2
    assert main([*argv, "--eval-data", f"Bad-Name={questions}"]) == 2
