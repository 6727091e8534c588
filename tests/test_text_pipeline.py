"""Text end to end: pretraining on a .txt corpus, the tokenizer travelling with every model,
embedding and probing labelled .tsv files, fine-tuning, the TF-IDF baseline and bench."""

import json

import numpy as np
import pytest

from data2vec.bench import bench
from data2vec.cli import main
from data2vec.config import load_config
from data2vec.data.text_pretrain import TokenStore
from data2vec.data.tokenizer import TextTokenizer
from data2vec.engine.trainer import pretrain
from data2vec.evaluate.features import embed_path
from data2vec.evaluate.tfidf import TfIdf
from data2vec.finetune import load_finetuned, run_finetune

TINY_TEXT = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "encoder.vocab_size=300",
    "encoder.max_positions=32", "data.block_size=32", "data.batch_size=8", "data.num_workers=0",
    "decoder.dim=32", "decoder.layers=2", "target.top_k=2", "mask.clones=2",
    "optim.warmup_steps=2", "optim.lr=3e-3", "train.progress=false", "train.tensorboard=false",
]  # fmt: skip

ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
FILLER = ["the", "a", "is", "was", "very", "and", "of"]


def _sentence(rng, topic: list[str], n: int) -> str:
    return " ".join(rng.choice(topic + FILLER) for _ in range(n))


def text_corpus(root, n_docs: int = 300):
    """A .txt corpus of topical documents of 4-40 words."""
    rng = np.random.default_rng(0)
    docs = [
        _sentence(rng, [ANIMALS, COLOURS][i % 2], int(rng.integers(4, 40))) for i in range(n_docs)
    ]
    path = root / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A corpus of topical documents and a labelled, trivially separable split."""
    root = tmp_path_factory.mktemp("text")
    text_corpus(root)
    rng = np.random.default_rng(1)
    for name, n in (("train", 120), ("test", 60)):
        lines = ["text\tlabel"]
        for i in range(n):
            label = ["animal", "colour"][i % 2]
            lines.append(f"{_sentence(rng, [ANIMALS, COLOURS][i % 2], 8)}\t{label}")
        (root / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = root / "run"
    cfg = load_config("text-v2-tiny", [*TINY_TEXT, "train.max_steps=30"])
    result = pretrain(cfg, root / "corpus.txt", run)
    return root, run, result


def test_pretrain__loss_falls_and_tokenizer_is_saved_with_every_checkpoint(text_data):
    _, run, result = text_data
    assert result.steps == 30
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    tok = TextTokenizer.load(ckpt / "tokenizer.json")
    cfg = load_config(ckpt / "config.yaml")
    # the model's vocabulary is the trained tokenizer's (a tiny corpus gives fewer tokens)
    assert cfg.encoder.vocab_size == tok.vocab_size <= 300
    assert tok.decode(tok.encode("the cat is red")) == "the cat is red"


def test_resume__reuses_tokenizer_and_store_and_continues(text_data, tmp_path):
    root, _, _ = text_data
    cfg = load_config("text-v2-tiny", [*TINY_TEXT, "train.max_steps=4", "train.checkpoint_every=2"])
    pretrain(cfg, root / "corpus.txt", tmp_path / "r")
    before = (tmp_path / "r" / "tokenizer.json").read_bytes()
    stamp = (tmp_path / "r" / "tokens" / "tokens.bin").stat().st_mtime_ns
    cfg = load_config("text-v2-tiny", [*TINY_TEXT, "train.max_steps=6", "train.checkpoint_every=2"])
    res = pretrain(cfg, root / "corpus.txt", tmp_path / "r", resume=True)
    assert res.steps == 6
    assert (tmp_path / "r" / "tokenizer.json").read_bytes() == before
    assert (tmp_path / "r" / "tokens" / "tokens.bin").stat().st_mtime_ns == stamp


def test_embed_and_probe_a_labelled_tsv(text_data, capsys):
    root, run, _ = text_data
    feats = embed_path(run, root / "test.tsv", progress=False)
    assert feats.features.shape == (60, 32) and feats.classes == ["animal", "colour"]
    assert (feats.labels == np.arange(60) % 2).all()  # the file's order is kept
    # a text's features do not depend on what it is batched with
    one = embed_path(run, root / "test.tsv", progress=False, batch_size=1)
    assert np.allclose(one.features, feats.features, atol=1e-5)
    code = main(
        ["evaluate", "--checkpoint", str(run), "--train", str(root / "train.tsv"),
         "--test", str(root / "test.tsv"), "--probe", "knn", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_test"] == 60 and out["accuracy"] > 0.9  # topical words separate the classes


def test_finetune_text_classification_learns_a_separable_task(text_data, tmp_path):
    root, run, _ = text_data
    summary = run_finetune(
        "text-classification", run, root / "train.tsv", root / "test.tsv", tmp_path / "ft",
        ["max_steps=60", "eval_every=30", "lr=2e-3", "batch_size=16", "num_workers=0",
         "progress=false", "tensorboard=false"],
    )  # fmt: skip
    assert summary["best_metrics"]["accuracy"] >= 0.95
    assert "f1" in summary["best_metrics"]
    model = load_finetuned(tmp_path / "ft")
    assert model.classes == ["animal", "colour"]
    assert (tmp_path / "ft" / "best" / "tokenizer.json").is_file()
    assert model.model.encoder.tokenizer is not None


def test_tfidf__matches_scikit_learn():
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    texts = ["the cat sat on the mat", "a dog and a cat", "red blue red", "the dog ran", "mat mat"]
    ours = TfIdf(max_features=100, min_df=1).fit(texts)
    ref = sk.TfidfVectorizer(min_df=1)
    expected = ref.fit_transform(texts).toarray()
    assert sorted(ours.vocab) == list(ref.get_feature_names_out())
    assert np.allclose(ours.transform(texts), expected, atol=1e-6)


def test_bench__text_preset_with_seq_len():
    r = bench("text-v2-tiny", batch=2, steps=1, warmup=0, seq_len=16, overrides=TINY_TEXT)
    assert r["input"] == "16 tokens" and r["step_time_s"] > 0
    # FLOPs grow with the sequence: the counted step really ran on seq_len tokens
    r2 = bench("text-v2-tiny", batch=2, steps=1, warmup=0, seq_len=32, overrides=TINY_TEXT)
    assert r2["flops_per_step"] > 1.8 * r["flops_per_step"]


def test_cli_train_tokenizer__then_pretrain_with_it(text_data, tmp_path, capsys):
    root, _, _ = text_data
    code = main(
        ["data", "train-tokenizer", "--data", str(root / "corpus.txt"), "--out",
         str(tmp_path / "tok"), "--vocab-size", "280"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["documents"] == 300 and report["vocab_size"] <= 280
    tok_file = tmp_path / "tok" / "tokenizer.json"
    cfg = load_config(
        "text-v2-tiny", [*TINY_TEXT, "train.max_steps=0", f"data.tokenizer={tok_file}"]
    )
    pretrain(cfg, root / "corpus.txt", tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.encoder.vocab_size == report["vocab_size"]


def test_cli_bad_text_inputs_give_clear_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n   \n", encoding="utf-8")
    code = main(
        ["pretrain", "--preset", "text-v2-tiny", "--data", str(tmp_path / "empty.txt"),
         "--out", str(tmp_path / "run"), *TINY_TEXT]
    )  # fmt: skip
    assert code == 2
    assert "no text" in capsys.readouterr().err
    code = main(
        ["pretrain", "--preset", "text-v2-tiny", "--data", str(tmp_path / "missing.txt"),
         "--out", str(tmp_path / "run2"), *TINY_TEXT]
    )  # fmt: skip
    assert code == 2


def test_pretrain__broken_text_is_counted_and_reported_never_fatal(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"good one two\n\n\xff\xfe broken bytes\n\n   \n\nlast doc\n")
    (corpus / "b.jsonl").write_text(
        '{"text": "json doc"}\n{bad json\n{"text": ""}\n{"nope": 1}\n', encoding="utf-8"
    )
    (corpus / "empty.txt").write_bytes(b"")
    run = tmp_path / "run"
    result = pretrain(load_config("text-v2-tiny", [*TINY_TEXT, "train.max_steps=2"]), corpus, run)
    assert result.steps == 2
    skipped = (run / "skipped.tsv").read_text(encoding="utf-8")
    assert "b.jsonl:2" in skipped and "b.jsonl:4" in skipped
    store = TokenStore.open(run / "tokens")
    # every good document kept (the one with bad bytes too, with U+FFFD), nothing else
    assert store is not None and store.num_documents == 4
    tok = TextTokenizer.load(run / "tokenizer.json")
    docs = {tok.decode(store.document(i).tolist()) for i in range(store.num_documents)}
    assert docs == {"good one two", "\ufffd\ufffd broken bytes", "last doc", "json doc"}
