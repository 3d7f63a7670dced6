"""The one configuration schema for every command, and its loader.

Sections are plain dataclasses; omegaconf turns them into a structured config so YAML files and
dotlist overrides (``model.n_layers=4``) are type-checked against them. Each field carries its help
text and range in ``metadata`` so the reference in docs/configuration.md is generated from this file and cannot
drift. Everything here is light (no torch): validation runs before any heavy import, process group
or data access.

A YAML file may inherit from others with ``extends: base.yaml`` (or a list), paths relative to the
file; later files and then command-line overrides win.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import ConfigError
from pretrain.fileio import write_text_atomic

# --------------------------------------------------------------------------------------------
# Field helper: default + help + range, in one place.
# --------------------------------------------------------------------------------------------


def fld(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
) -> Any:
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = fld("run", "Run name; also the default wandb run name.")
    dir: str = fld("runs/${run.name}", "Run directory: resolved config, metrics, checkpoints, wandb files, plots.")
    seed: int = fld(1337, "Global seed (model init, data shuffling, sampling).", ge=0)
    log_level: str = fld("info", "Log level on global rank 0.", choices=("debug", "info", "warning", "error"))
    log_all_ranks: bool = fld(False, "Log at run.log_level on every rank, not only warnings on ranks > 0.")
    lease_heartbeat_s: float = fld(10.0, "Seconds between heartbeats of the run directory's lease (RUN_DIR/.lease/gen-NNNNNN, by global rank 0; the scrub's too). Each heartbeat first checks that no other job took the lease over; a job that lost it stops every rank with exit status 6.", gt=0)
    lease_stale_s: float = fld(120.0, "A lease whose heartbeat is older than this (or whose process is gone, same host) is taken over; a live one makes a second job exit 2. Must exceed run.lease_heartbeat_s.", gt=0)


@dataclass
class ModelConfig:
    vocab_size: int = fld(8192, "Vocabulary size of the tokenizer; the embedding is padded up to model.vocab_multiple_of.", ge=2)
    vocab_multiple_of: int = fld(64, "Pad the vocabulary to a multiple of this for fast matmuls.", ge=1)
    n_layers: int = fld(6, "Number of Transformer blocks.", ge=1)
    n_heads: int = fld(6, "Attention (query) heads.", ge=1)
    n_kv_heads: int | None = fld(None, "Key/value heads for grouped-query attention (null = n_heads).", ge=1)
    d_model: int = fld(384, "Hidden size.", ge=1)
    ffn_hidden: int | None = fld(None, "SwiGLU hidden size (null = 8/3 * d_model rounded up to model.ffn_multiple_of).", ge=1)
    ffn_multiple_of: int = fld(64, "Round the derived SwiGLU hidden size up to a multiple of this.", ge=1)
    max_seq_len: int = fld(1024, "Longest sequence the model accepts (RoPE table size).", ge=1)
    rope_theta: float = fld(10000.0, "RoPE base frequency.", gt=0)
    norm_eps: float = fld(1e-5, "RMSNorm epsilon.", gt=0)
    tie_embeddings: bool = fld(False, "Share the input embedding with the output projection.")
    init_std: float = fld(0.02, "Std of the normal init; residual projections are scaled by 1/sqrt(2 * n_layers).", gt=0)
    attention: str = fld("auto", "Attention backend: auto picks the fastest available for the device, dtype and masking and logs it (flash_attn on CUDA when installed, else flex for document masking, else sdpa; on CPU eager for bf16 sequences <= 256 tokens, else sdpa); flash_attn and flex need CUDA; eager is the reference.", choices=("auto", "sdpa", "flash_attn", "flex", "eager"))
    doc_masking: bool = fld(False, "Packed sequences: tokens attend only within their own document.")
    reset_positions: bool = fld(False, "Restart RoPE positions at every document boundary.")
    compile: bool = fld(False, "torch.compile each Transformer block (fuses RMSNorm, RoPE, SwiGLU; ~1.17x on the CPU bench shape, costs a one-time compile at start-up).")
    activation_checkpointing: str = fld("none", "Recompute activations in backward: full = keep only each block's input; selective = also keep the matmul and fused-attention outputs and recompute only the cheap elementwise ops (norms, RoPE, SwiGLU, casts), for a fraction of full's recompute; every_n = full on every n-th block.", choices=("none", "full", "selective", "every_n"))
    checkpoint_every_n: int = fld(2, "With activation_checkpointing=every_n: checkpoint every n-th block.", ge=1)
    loss_chunk_size: int | None = fld(None, "Tokens per chunk of the fused linear + cross-entropy: only [chunk x vocab] logits exist at a time (0 = plain F.cross_entropy over full fp32 logits, the reference; null = 4096 on CUDA, 512 on CPU, the faster size measured on each).", ge=0)


@dataclass
class SourceConfig:
    name: str = fld("main", "Source name (used in logs and mixing state).")
    path: str = fld("artifacts/scrubbed", "Scrubbed output directory (with manifest.json), or files/glob when data.require_scrubbed=false.")
    weight: float = fld(1.0, "Sampling weight when mixing several sources.", gt=0)
    text_field: str = fld("text", "Field holding the document text.")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = fld([SourceConfig()], "Training sources, mixed by weight.")
    validation: list[SourceConfig] = fld([], "Validation sources (empty = hold out data.val_fraction of the training documents).")
    val_fraction: float = fld(0.005, "Fraction of training documents held out for validation when no validation source is given, chosen by a stable hash of the document id (never trained on).", ge=0, lt=1)
    tokenizer: str = fld("artifacts/tokenizer/tokenizer.json", "Hugging Face tokenizer.json used by the loader.")
    seq_len: int = fld(256, "Training sequence length (tokens per sample, before the +1 shift).", ge=1)
    num_workers: int = fld(0, "DataLoader worker processes per rank.", ge=0)
    shuffle: bool = fld(True, "Shuffle the chunk order every epoch and the documents inside each chunk (seeded by run.seed and the epoch).")
    chunk_docs: int = fld(16, "Documents per chunk: the unit of work dealt to ranks and workers and the shuffle window; a resume re-reads at most one chunk per worker and source.", ge=1)
    mode: str = fld("streaming", "streaming: tokenize scrubbed shards on the fly; pretokenized: read the memmap shards of `data_pipelines pretokenize` (validation still streams from the scrubbed sources).", choices=("streaming", "pretokenized"))
    pretokenized_dir: str = fld("artifacts/pretokenized", "Directory written by `data_pipelines pretokenize`.")
    require_scrubbed: bool = fld(True, "Refuse sources without a scrub manifest.json (privacy gate).")
    prefetch: int = fld(4, "Batches prefetched per DataLoader worker (with data.num_workers > 0).", ge=1)


@dataclass
class TokenizerConfig:
    input: str = fld("artifacts/scrubbed", "Scrubbed output directory to train on (must hold manifest.json unless data.require_scrubbed=false).")
    output: str = fld("artifacts/tokenizer", "Directory for tokenizer.json.")
    vocab_size: int = fld(8192, "BPE vocabulary size, special tokens included.", ge=256)
    min_frequency: int = fld(2, "Minimum pair frequency for a merge.", ge=1)
    max_docs: int = fld(0, "Train on this many documents spread evenly over all shards (0 = all).", ge=0)


@dataclass
class NormalizeConfig:
    enabled: bool = fld(True, "Repair invalid UTF-8, NFC-normalize, strip control characters.")
    max_invalid_utf8_ratio: float = fld(0.01, "Records with a larger fraction of undecodable bytes are dropped as malformed.undecodable; fewer are repaired with U+FFFD.", ge=0, le=1)


@dataclass
class LanguageConfig:
    enabled: bool = fld(True, "Keep documents in scrub.language.languages (fastText lid.176, offline).")
    languages: list[str] = fld(["en"], "ISO 639-1 codes to keep.")
    threshold: float = fld(0.65, "Minimum language probability.", ge=0, le=1)
    max_chars: int = fld(1000, "Classify at most this many leading characters (lid.176 runs at only ~5 MB/s on this CPU; a paragraph identifies the language reliably).", ge=100)


@dataclass
class QualityConfig:
    enabled: bool = fld(True, "Gopher quality/repetition rules and C4 line rules.")
    min_words: int = fld(50, "Gopher: minimum words per document.", ge=0)
    max_words: int = fld(100000, "Gopher: maximum words per document.", ge=1)
    min_mean_word_len: float = fld(3.0, "Gopher: minimum mean word length.", ge=0)
    max_mean_word_len: float = fld(10.0, "Gopher: maximum mean word length.", ge=0)
    max_symbol_word_ratio: float = fld(0.1, "Gopher: maximum ratio of '#' and '...' to words.", ge=0)
    max_bullet_lines_ratio: float = fld(0.9, "Gopher: maximum fraction of lines starting with a bullet.", ge=0, le=1)
    max_ellipsis_lines_ratio: float = fld(0.3, "Gopher: maximum fraction of lines ending with an ellipsis.", ge=0, le=1)
    min_alpha_words_ratio: float = fld(0.8, "Gopher: minimum fraction of words with an alphabetic character.", ge=0, le=1)
    min_stop_words: int = fld(2, "Gopher: minimum English stop words present.", ge=0)
    repetition: bool = fld(True, "Gopher repetition rules (duplicate lines/paragraphs, top and duplicated n-grams).")
    max_dup_line_frac: float = fld(0.30, "Gopher: maximum fraction of lines that duplicate an earlier line.", ge=0, le=1)
    max_dup_para_frac: float = fld(0.30, "Gopher: maximum fraction of paragraphs that duplicate an earlier one.", ge=0, le=1)
    max_dup_line_char_frac: float = fld(0.20, "Gopher: maximum fraction of characters in duplicated lines.", ge=0, le=1)
    max_dup_para_char_frac: float = fld(0.20, "Gopher: maximum fraction of characters in duplicated paragraphs.", ge=0, le=1)
    max_top_ngram_char_frac: list[float] = fld([0.20, 0.18, 0.16], "Gopher: maximum character fraction of the most frequent 2-, 3- and 4-gram.")
    max_dup_ngram_char_frac: list[float] = fld([0.15, 0.14, 0.13, 0.12, 0.11, 0.10], "Gopher: maximum character fraction in repeated 5- to 10-grams.")
    c4_lines: bool = fld(True, "C4 line rules (drop lines without terminal punctuation, short lines, javascript/policy lines).")
    c4_min_words_per_line: int = fld(5, "C4: lines with fewer words are removed.", ge=0)
    c4_min_sentences: int = fld(3, "C4: documents with fewer sentences left after line cleaning are dropped.", ge=0)
    c4_drop_curly_bracket: bool = fld(True, "C4: drop documents containing '{' (code); off for corpora with math or markup.")


@dataclass
class DedupConfig:
    enabled: bool = fld(True, "Drop exact and near duplicates across all shards of the run.")
    exact: bool = fld(True, "Exact duplicates by normalized-text hash.")
    near: bool = fld(True, "Near duplicates by MinHash + LSH.")
    num_perm: int = fld(128, "MinHash permutations.", ge=16)
    threshold: float = fld(0.8, "Estimated Jaccard similarity above which a document is a near duplicate.", gt=0, le=1)
    ngram: int = fld(5, "Word n-gram size of the shingles.", ge=1)
    seed: int = fld(1, "Seed of the MinHash permutations (changing it changes signatures, not the decisions' determinism).", ge=0)
    method: str = fld("memory", "memory: decide duplicates in one process holding every signature (fine to tens of millions of documents); bucketed: out-of-core stages (buckets, pairs) whose memory is bounded by one bucket, for corpora beyond one machine. Both keep the same documents.", choices=("memory", "bucketed"))
    buckets: int = fld(64, "bucketed: hash partitions of the exact keys and of the LSH band keys. One buckets step holds ~48 N/buckets bytes, one pairs step ~96 x bands x N/buckets bytes (N = candidates of the whole run, bands = 9 at num_perm 128 and threshold 0.8) plus the signatures of colliding documents: raise it with the corpus to keep each process's memory fixed.", ge=1)


@dataclass
class ToxicityConfig:
    enabled: bool = fld(True, "Score documents with the bundled profanity classifier and word lists.")
    threshold: float = fld(0.9, "Drop (or mask) documents whose toxicity score is at least this.", ge=0, le=1)
    action: str = fld("drop", "drop the document, or mask the toxic spans.", choices=("drop", "mask"))
    wordlists: list[str] = fld([], "Extra word-list files (one term per line), C4-style.")
    quantile: float = fld(0.9, "Document score = this quantile of its sentence-chunk scores (1.0 = max; see toxicity.py for why not max).", ge=0, le=1)
    chunk_chars: int = fld(400, "Sentences are grouped into chunks of about this many characters before scoring.", ge=20)


@dataclass
class BiasConfig:
    enabled: bool = fld(True, "Audit identity-term mentions among kept and dropped documents, per filter.")
    terms_file: str = fld("", "Identity-term groups (JSON {group: [terms]}); empty = the bundled list.")
    disparity_threshold: float = fld(2.0, "Flag a group whose removal rate is this many times a filter's overall rate.", gt=0)
    min_docs: int = fld(10, "Flag a group only when at least this many documents mentioning it reached the filter.", ge=1)
    counterfactual_rate: float = fld(0.0, "Fraction of kept documents given a gendered-term swap (0 = off).", ge=0, le=1)


# The PII types the scrub knows, in priority order: where detections of different types overlap,
# the earlier type wins (a secret inside a URL beats the URL's credentials; credentials in a URL
# beat an email-looking ``pass@host``; a checksum-validated IBAN or card beats a phone-shaped digit
# run). The schema owns the list so validation needs no import from data_pipelines.
PII_TYPES: tuple[str, ...] = ("secret", "url_credentials", "email", "iban", "credit_card", "ssn", "ip", "phone")


@dataclass
class PIIConfig:
    enabled: bool = fld(True, "Detect and redact PII in every kept document.")
    types: list[str] = fld(
        ["email", "phone", "ip", "credit_card", "ssn", "iban", "secret", "url_credentials"],
        "PII types to redact (any of: secret, url_credentials, email, iban, credit_card, ssn, ip, phone).",
    )
    replacement: str = fld("placeholder", "placeholder: one special token per type (data_pipelines/scrub/filters/pii_types.py); pseudonym: a keyed HMAC-SHA256 tag per value (type + 8 hex digits), the same value giving the same tag corpus-wide.", choices=("placeholder", "pseudonym"))
    secret_env: str = fld("PII_HMAC_SECRET", "Environment variable holding the pseudonym key (never written anywhere).")
    redact_private_ips: bool = fld(False, "Also redact private IP ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7). Loopback, unspecified, link-local, multicast and documentation addresses are always kept; all other addresses, reserved or unassigned space included, are always redacted.")
    phone_regions: list[str] = fld(["US", "GB", "DE", "FR", "IN"], "Regions tried for national-format phone numbers without a cue word, besides the regions the document itself names near the number (a +CC number, an address under a country domain); numbers with + or 00 are checked for every country.")
    phone_cues: bool = fld(True, "Where the text says phone (a cue word before the number, a label after it or on the line above, a spoken 'call me back on ...', in 24 languages) accept any plausible digit run as a phone: local 6-9 digit numbers, national numbers of any region, a country code without +, a number broken across lines. A reference word right before the number (invoice, order, account) always wins.")
    engine: str = fld("auto", "Candidate scan: hyperscan (one pass, x86), re (per-type compiled regex), auto = hyperscan when installed.", choices=("auto", "hyperscan", "re"))


# The PII-shaped canary kinds (data_pipelines/scrub/canaries.py defines their sentences and
# spaces); the schema owns the names so validation needs no import from data_pipelines.
CANARY_PII_KINDS: tuple[str, ...] = ("email", "phone", "credit_card", "ssn", "api_key")


@dataclass
class CanaryConfig:
    enabled: bool = fld(False, "Plant canaries (random secrets at known repetition counts) in the raw corpus for the memorization audit (`pretrain audit`). Each copy goes into a different host document; the registry of secrets is written beside scrub.output, never inside it.")
    seed: int = fld(0, "Seed of the canaries' secrets, names and host documents.", ge=0)
    levels: list[int] = fld([1, 4, 16, 64], "Repetition levels: at each level every canary is planted this many times (in as many different documents).")
    secrets_per_level: int = fld(2, "Control canaries per level (8 random digits the scrub is not meant to remove: they show the audit can see memorization).", ge=0)
    pii_per_level: int = fld(5, "PII-shaped canaries per level (secrets in realistic sentences that the scrub should redact), their kinds taken in turn from scrub.canaries.pii_kinds.", ge=0)
    pii_kinds: list[str] = fld(list(CANARY_PII_KINDS), "Kinds of the PII-shaped canaries (any of: " + ", ".join(CANARY_PII_KINDS) + ").")
    host_pool: int = fld(10000, "Hosts are chosen among the first this many documents of the corpus (the planning pass reads only those).", ge=1)
    min_host_words: int = fld(300, "A host document has at least this many words after the quality filter and is kept by the per-document filters as it is, so the planted sentences cannot tip a filter's decision.", ge=0)
    registry: str = fld("", "Registry file (secrets, prefixes, levels, hosts, what the scrub did to each copy); empty = <scrub.output>.canaries.json, beside the output. Must lie outside scrub.output.")


@dataclass
class ScrubConfig:
    inputs: list[str] = fld(["builtin:enwiki-sample"], "Input files/globs, directories, `hf:NAME[:CONFIG]` hub datasets, or builtin:enwiki-sample.")
    input_format: str = fld("auto", "Input format (auto = from the file extension).", choices=("auto", "jsonl", "parquet", "text", "hf"))
    text_field: str = fld("text", "Field holding the document text.")
    id_field: str = fld("id", "Field holding the document id (missing = file:line).")
    hf_split: str = fld("train", "Split of hub datasets.")
    output: str = fld("artifacts/scrubbed", "Output directory: shards, manifest.json, report.md, report.json.")
    output_format: str = fld("parquet", "Shard format.", choices=("parquet", "jsonl.zst"))
    workers: int = fld(1, "Worker processes.", ge=1)
    rank: int = fld(0, "This machine's index among scrub.world_size (e.g. a SLURM array task id).", ge=0)
    world_size: int = fld(1, "Machines sharing the scrub.", ge=1)
    max_doc_bytes: int = fld(1_000_000, "Records larger than this are dropped as too_large.", ge=1)
    audit_sample: int = fld(20, "Dropped documents (PII redacted) written to the audit sample per reason.", ge=0)
    stage: str = fld("all", "all: the whole scrub; or one step of a multi-machine run: signatures (phase 1), buckets (exact duplicates per bucket, dedup.method=bucketed), pairs (near-duplicate pairs per bucket, bucketed), write (dedup decision, phase 3), merge (manifest + report).", choices=("all", "signatures", "buckets", "pairs", "write", "merge"))
    wait_timeout_s: float = fld(0.0, "With stage=all and world_size > 1: wait this long for other ranks' phase outputs (0 = fail at once and name what is missing).", ge=0)
    normalize: NormalizeConfig = fld(NormalizeConfig(), "Normalization.")
    language: LanguageConfig = fld(LanguageConfig(), "Language filter.")
    quality: QualityConfig = fld(QualityConfig(), "Quality filter.")
    dedup: DedupConfig = fld(DedupConfig(), "Deduplication.")
    toxicity: ToxicityConfig = fld(ToxicityConfig(), "Toxicity filter.")
    bias: BiasConfig = fld(BiasConfig(), "Bias audit.")
    pii: PIIConfig = fld(PIIConfig(), "PII redaction.")
    canaries: CanaryConfig = fld(CanaryConfig(), "Canaries planted for the memorization audit.")


@dataclass
class TrainConfig:
    micro_batch_size: int = fld(8, "Sequences per rank per micro-step.", ge=1)
    grad_accum_steps: int = fld(1, "Micro-steps per optimizer step.", ge=1)
    global_batch_size: int | None = fld(None, "If set, must equal micro_batch_size * grad_accum_steps * data-parallel size.", ge=1)
    max_steps: int = fld(1000, "Stop after this many optimizer steps.", ge=0)
    max_tokens: int | None = fld(None, "Stop once this many tokens were trained on.", ge=1)
    max_time_s: float | None = fld(None, "Stop (and save) after this wall-clock budget in seconds, counted from the start of the command (set-up and resume included).", gt=0)
    precision: str = fld("bf16", "Training precision. auto: bf16 where the device multiplies bf16 natively (CUDA Ampere+, CPUs with avx512_bf16/AMX), else fp16 on older GPUs and fp32 on other CPUs (their bf16 matmuls run through a reference GEMM ~100x slower than fp32).", choices=("auto", "bf16", "fp16", "fp32"))
    fp8: bool = fld(False, "Float8 matmuls (torchao) for the large Linear layers; CUDA compute capability >= 8.9, ZeRO-1/2.")
    grad_clip: float = fld(1.0, "Clip the global gradient norm to this (0 = off).", ge=0)
    eval_every: int = fld(200, "Validation every this many steps (0 = never).", ge=0)
    eval_batches: int = fld(20, "Validation batches per evaluation.", ge=1)
    log_every: int = fld(10, "Log metrics every this many steps. Only these steps (and saves and stops) read values the device computed, such as the loss: the others never make the host wait for the GPU.", ge=1)
    max_nonfinite_in_a_row: int = fld(5, "Save and stop (exit 3) after this many consecutive NaN/Inf losses or gradient norms (their updates are skipped on the device); the run stops at the next logging step after the run of them.", ge=1)
    progress_bar: bool = fld(True, "Show a progress bar on rank 0.")
    hang_timeout_s: float = fld(1800.0, "Hang watchdog: no optimizer step completed for this long (start-up, first step, evaluation and saves not counted) -> every rank writes its Python stacks to RUN_DIR/hang/rank_NNNNN.txt and exits with status 4 (0 = off). Keep it below train.collective_timeout_s.", ge=0)
    collective_timeout_s: float = fld(2400.0, "Timeout of a collective (all-reduce, barrier) before torch.distributed fails it.", gt=0)
    ignore_memory_plan: bool = fld(False, "Start even when the memory plan (what `pretrain plan` prints, checked at start-up before the engine is built) predicts that a rank's peak exceeds its device memory.")
    device_memory_gib: float | None = fld(None, "Memory one rank may use, for the start-up memory check: null = the GPU's total memory; on CPU, where ranks share the host's memory with everything else, the check runs only when this is set.", gt=0)


@dataclass
class OptimConfig:
    lr: float = fld(6e-4, "Peak learning rate.", gt=0)
    min_lr: float = fld(6e-5, "Learning rate at the end of the decay.", ge=0)
    schedule: str = fld("cosine", "Learning-rate schedule after warmup.", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = fld(100, "Linear warmup steps.", ge=0)
    decay_fraction: float = fld(0.2, "WSD: fraction of max_steps spent in the final decay.", ge=0, le=1)
    weight_decay: float = fld(0.1, "AdamW weight decay.", ge=0)
    beta1: float = fld(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = fld(0.95, "AdamW beta2.", ge=0, lt=1)
    eps: float = fld(1e-8, "AdamW epsilon.", gt=0)
    decay_norms: bool = fld(False, "Apply weight decay to norm weights and biases (all 1-D parameters).")
    decay_embeddings: bool = fld(False, "Apply weight decay to embeddings.")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = fld(1, "ZeRO stage.", ge=0, le=3)
    offload_optimizer: bool = fld(False, "Offload optimizer state to CPU (DeepSpeed CPU Adam).")
    offload_params: bool = fld(False, "Offload parameters to CPU (ZeRO-3 only).")
    overlap_comm: bool = fld(True, "Overlap gradient reduction with backward.")
    contiguous_gradients: bool = fld(True, "Copy gradients into a contiguous buffer.")
    reduce_bucket_size: int = fld(50_000_000, "Elements per gradient-reduction bucket.", ge=1)
    allgather_bucket_size: int = fld(50_000_000, "Elements per all-gather bucket.", ge=1)
    stage3_prefetch_bucket_size: int = fld(50_000_000, "ZeRO-3: elements prefetched.", ge=1)
    stage3_param_persistence_threshold: int = fld(100_000, "ZeRO-3: parameters smaller than this stay unpartitioned.", ge=0)
    zero3_init: bool = fld(True, "ZeRO-3: build the model already partitioned (deepspeed.zero.Init), so no rank ever holds all of it; false = build it whole, then partition.")
    fp16_initial_scale_power: int = fld(16, "fp16: initial loss scale is 2**this.", ge=0)
    extra: dict[str, Any] = fld({}, "Passthrough: merged last into the generated DeepSpeed config (advanced keys).")


# Run-defining settings a resume refuses to change unless checkpoint.allow_changes names them (a
# deliberate change, such as a vocabulary surgery). The schema owns the list so validation needs
# no import from the resume planner (pretrain/checkpoint/plan.py), which says why for each.
RESUME_ALLOWABLE: tuple[str, ...] = ("data.tokenizer", "data.val_fraction", "model.rope_theta", "model.norm_eps")


@dataclass
class CheckpointConfig:
    dir: str = fld("${run.dir}/checkpoints", "Checkpoint directory.")
    every_steps: int = fld(500, "Save every this many steps (0 = off).", ge=0)
    every_minutes: float = fld(0.0, "Also save when this many minutes passed since the last save (0 = off).", ge=0)
    keep_last: int = fld(3, "Keep the newest N complete checkpoints.", ge=1)
    keep_every: int = fld(0, "Also keep every checkpoint whose step is a multiple of this (0 = off).", ge=0)
    resume: str = fld("auto", "auto: newest complete checkpoint in checkpoint.dir; never: start fresh; or a checkpoint path.")
    overwrite: bool = fld(False, "resume=never: start over an existing run (deleting its checkpoints); resume=PATH: delete the checkpoints in checkpoint.dir later than PATH.")
    save_on_exit: bool = fld(True, "Save when stopping on a signal, the time budget or max_steps.")
    allow_changes: list[str] = fld([], "Resume even though these run-defining settings differ from the checkpoint's (a deliberate change, logged), e.g. [data.tokenizer] for a vocabulary surgery; any of: " + ", ".join(RESUME_ALLOWABLE) + ". The tokenizer is compared by content, so a moved or re-saved file is no change.")


@dataclass
class WandbConfig:
    mode: str = fld("auto", "auto = online with WANDB_API_KEY, else offline.", choices=("auto", "online", "offline", "disabled"))
    project: str = fld("pretrain", "wandb project.")
    entity: str | None = fld(None, "wandb entity (team or user).")
    name: str | None = fld(None, "wandb run name (null = run.name).")
    tags: list[str] = fld([], "wandb tags.")


@dataclass
class BenchConfig:
    warmup_steps: int = fld(3, "Steps run before timing.", ge=0)
    steps: int = fld(10, "Timed steps.", ge=1)
    profile: bool = fld(False, "Also run the timed steps under torch.profiler and write the top-operator table to <run.dir>/bench_profile.txt.")


@dataclass
class AuditConfig:
    checkpoint: str = fld("", "Checkpoint to audit: a run, checkpoint or step directory (empty = the newest complete checkpoint in checkpoint.dir).")
    references: int = fld(4096, "Random secrets of each canary's format scored as references; the rank exposure resolves up to log2 of this many bits.", ge=16)
    seed: int = fld(0, "Seed of the reference secrets (fixed, so a recomputation scores the same candidates).", ge=0)
    batch_size: int = fld(256, "Candidates scored per forward pass.", ge=1)
    device: str = fld("auto", "auto: CUDA when available, else CPU.", choices=("auto", "cpu", "cuda"))


@dataclass
class Config:
    run: RunConfig = fld(RunConfig(), "Run identity and output directory.")
    model: ModelConfig = fld(ModelConfig(), "The Transformer.")
    data: DataConfig = fld(DataConfig(), "The training data loader.")
    tokenizer: TokenizerConfig = fld(TokenizerConfig(), "Tokenizer training.")
    scrub: ScrubConfig = fld(ScrubConfig(), "The bias and privacy scrub stage.")
    train: TrainConfig = fld(TrainConfig(), "The training loop.")
    optim: OptimConfig = fld(OptimConfig(), "Optimizer and learning-rate schedule.")
    deepspeed: DeepSpeedConfig = fld(DeepSpeedConfig(), "The DeepSpeed engine.")
    checkpoint: CheckpointConfig = fld(CheckpointConfig(), "Checkpoints and resume.")
    wandb: WandbConfig = fld(WandbConfig(), "Weights & Biases monitoring.")
    bench: BenchConfig = fld(BenchConfig(), "`pretrain bench`.")
    audit: AuditConfig = fld(AuditConfig(), "`pretrain audit`: canary memorization audit of a checkpoint.")


# --------------------------------------------------------------------------------------------
# Cross-field rules. Each problem names every key involved.
# --------------------------------------------------------------------------------------------


def data_parallel_size() -> int:
    """World size as the launcher announced it (torchrun, deepspeed, SLURM), before any process group."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _inside(path: str, directory: str) -> bool:
    p, d = Path(path).resolve(), Path(directory).resolve()
    return p == d or d in p.parents


def cross_field_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    p: list[str] = []
    m, t, d, ds, o = cfg.model, cfg.train, cfg.data, cfg.deepspeed, cfg.optim
    if m.d_model % m.n_heads:
        p.append(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    elif (m.d_model // m.n_heads) % 2:
        p.append(f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even for rotary embeddings")
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    if m.n_heads % kv:
        p.append(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({kv})")
    if d.seq_len > m.max_seq_len:
        p.append(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if m.reset_positions and not m.doc_masking:
        p.append("model.reset_positions=true requires model.doc_masking=true (restarted positions without document masking mix documents)")
    dp = world_size if world_size is not None else data_parallel_size()
    if t.global_batch_size is not None and t.global_batch_size != t.micro_batch_size * t.grad_accum_steps * dp:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must equal train.micro_batch_size ({t.micro_batch_size})"
            f" x train.grad_accum_steps ({t.grad_accum_steps}) x data-parallel size ({dp})"
            f" = {t.micro_batch_size * t.grad_accum_steps * dp}"
        )
    if cfg.run.lease_stale_s <= cfg.run.lease_heartbeat_s:
        p.append(f"run.lease_stale_s ({cfg.run.lease_stale_s}) must exceed run.lease_heartbeat_s ({cfg.run.lease_heartbeat_s})")
    if o.min_lr > o.lr:
        p.append(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    if ds.offload_params and ds.zero_stage != 3:
        p.append(f"deepspeed.offload_params=true requires deepspeed.zero_stage=3 (got {ds.zero_stage})")
    if ds.offload_optimizer and ds.zero_stage == 0:
        p.append("deepspeed.offload_optimizer=true requires deepspeed.zero_stage >= 1")
    if t.precision == "fp16" and ds.zero_stage == 0 and ds.offload_optimizer:
        p.append("train.precision=fp16 with deepspeed.offload_optimizer requires deepspeed.zero_stage >= 1")
    if cfg.scrub.rank >= cfg.scrub.world_size:
        p.append(f"scrub.rank ({cfg.scrub.rank}) must be below scrub.world_size ({cfg.scrub.world_size})")
    if cfg.scrub.quality.min_words > cfg.scrub.quality.max_words:
        p.append("scrub.quality.min_words must not exceed scrub.quality.max_words")
    if not d.sources:
        p.append("data.sources must list at least one source")
    for i, s in enumerate(d.sources):
        if not s.path:
            p.append(f"data.sources[{i}].path is empty")
    q = cfg.scrub.quality
    if q.min_mean_word_len > q.max_mean_word_len:
        p.append("scrub.quality.min_mean_word_len must not exceed scrub.quality.max_mean_word_len")
    if len(q.max_top_ngram_char_frac) != 3:
        p.append(f"scrub.quality.max_top_ngram_char_frac needs 3 values (for 2-, 3-, 4-grams), got {len(q.max_top_ngram_char_frac)}")
    if len(q.max_dup_ngram_char_frac) != 6:
        p.append(f"scrub.quality.max_dup_ngram_char_frac needs 6 values (for 5- to 10-grams), got {len(q.max_dup_ngram_char_frac)}")
    # Trainer / engine rules.
    derived = [k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps") if k in ds.extra]
    if derived:
        p.append(
            f"deepspeed.extra must not set {', '.join(derived)}: the batch shape comes from train.micro_batch_size,"
            " train.grad_accum_steps and the data-parallel size"
        )
    if t.eval_every > 0 and not d.validation and d.val_fraction == 0:
        p.append("train.eval_every > 0 needs validation data: set data.validation sources or data.val_fraction > 0 (or train.eval_every=0)")
    # Loader rules.
    for i, s in enumerate(d.validation):
        if not s.path:
            p.append(f"data.validation[{i}].path is empty")
    names = [s.name for s in d.sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"data.sources: the name '{name}' is used by sources {[i for i, n in enumerate(names) if n == name]}; names must be unique (loader state and pretokenized shards are keyed by name)")
    unknown_allow = [k for k in cfg.checkpoint.allow_changes if k not in RESUME_ALLOWABLE]
    if unknown_allow:
        p.append(f"checkpoint.allow_changes: {', '.join(unknown_allow)} cannot be allowed; the settings a resume "
                 f"may be told to accept are: {', '.join(RESUME_ALLOWABLE)}")
    # Canary rules.
    can = cfg.scrub.canaries
    if can.enabled:
        if not can.levels or any(n < 1 for n in can.levels) or len(set(can.levels)) != len(can.levels):
            p.append(f"scrub.canaries.levels must be distinct positive repetition counts; got {list(can.levels)}")
        elif max(can.levels) > can.host_pool:
            p.append(f"scrub.canaries.levels: {max(can.levels)} copies need as many host documents, more than scrub.canaries.host_pool ({can.host_pool})")
        unknown_kinds = [k for k in can.pii_kinds if k not in CANARY_PII_KINDS]
        if unknown_kinds:
            p.append(f"scrub.canaries.pii_kinds: unknown kind(s) {unknown_kinds}; expected any of {', '.join(CANARY_PII_KINDS)}")
        if can.pii_per_level and not can.pii_kinds:
            p.append("scrub.canaries.pii_per_level > 0 needs at least one kind in scrub.canaries.pii_kinds")
        if can.secrets_per_level == 0 and can.pii_per_level == 0:
            p.append("scrub.canaries: secrets_per_level and pii_per_level are both 0, so no canary would be planted")
        if can.registry and _inside(can.registry, cfg.scrub.output):
            p.append(f"scrub.canaries.registry ({can.registry}) must lie outside scrub.output ({cfg.scrub.output}): "
                     "the registry holds the secrets, and what lies in the scrub output may reach training")
    # PII rules.
    unknown_pii = [x for x in cfg.scrub.pii.types if x not in PII_TYPES]
    if unknown_pii:
        p.append(f"scrub.pii.types: unknown type(s) {unknown_pii}; expected any of {', '.join(PII_TYPES)}")
    # Engine: deepspeed.extra adds keys; it must not fork a setting the config owns (checkpoints,
    # export and the optimizer are built from the config's value, not DeepSpeed's).
    owned = {"zero_optimization.stage": "deepspeed.zero_stage", "bf16.enabled": "train.precision",
             "fp16.enabled": "train.precision", "torch_autocast": "train.precision",
             "gradient_clipping": "train.grad_clip",
             "optimizer": "the optim section", "scheduler": "the optim section"}
    for key, owner in owned.items():
        head, _, leaf = key.partition(".")
        if head in ds.extra and (not leaf or (isinstance(ds.extra[head], dict) and leaf in ds.extra[head])):
            p.append(f"deepspeed.extra.{key} is derived from {owner}; set that instead")
    return p


# --------------------------------------------------------------------------------------------
# Loading: files (with inheritance) -> unknown-key check -> typed merge -> ranges -> rules.
# --------------------------------------------------------------------------------------------


def _schema_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every valid dotted key of a dataclass schema, with its field (sections included)."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out[key] = f
        sub = _dataclass_type(f)
        if sub is not None:
            out.update(_schema_keys(sub, key + "."))
    return out


def _dataclass_type(f: dataclasses.Field) -> type | None:
    t = _type_of(f)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _list_item_dataclass(f: dataclasses.Field) -> type | None:
    import typing

    t = _type_of(f)
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t)
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return item
    return None


_TYPE_CACHE: dict[int, Any] = {}


def _type_of(f: dataclasses.Field) -> Any:
    """The evaluated annotation of a field (the module uses postponed annotations)."""
    if id(f) not in _TYPE_CACHE:
        _TYPE_CACHE[id(f)] = eval(f.type, globals()) if isinstance(f.type, str) else f.type  # noqa: S307
    return _TYPE_CACHE[id(f)]


def _similarity(a: str, b: str) -> float:
    """Edit similarity, also on sorted '_' parts so `lr_min` finds `min_lr`."""
    def norm(x: str) -> str:
        return "_".join(sorted(x.split("_")))

    return max(difflib.SequenceMatcher(None, a, b).ratio(), difflib.SequenceMatcher(None, norm(a), norm(b)).ratio())


def _suggest(key: str, valid: list[str]) -> str:
    """'; did you mean X?' for the nearest valid key: a sibling first, then anywhere."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    best = max(siblings, key=lambda k: _similarity(leaf, k.rpartition(".")[2]), default=None)
    if best is None or _similarity(leaf, best.rpartition(".")[2]) < 0.6:
        best = max(valid, key=lambda k: _similarity(key, k), default=None)
        if best is None or _similarity(key, best) < 0.6:
            return ""
    return f"; did you mean '{best}'?"


def _unknown_keys(node: Any, cls: type, prefix: str, where: str) -> list[str]:
    """Keys in a user dict that the schema does not have, each with the nearest valid key."""
    if not isinstance(node, dict):
        return []
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in node.items():
        key = f"{prefix}{k}"
        f = fields.get(str(k))
        if f is None:
            # data.sources[0].pth: match against data.sources.path, then put the index back.
            generic = re.sub(r"\[\d+\]", "", key)
            hint = _suggest(generic, _ALL_KEYS())
            m = re.match(r"(.*\[\d+\])\.", key)
            if m:
                hint = hint.replace(re.sub(r"\[\d+\]", "", m.group(1)) + ".", m.group(1) + ".")
            problems.append(f"unknown key '{key}'{where}{hint}")
            continue
        sub = _dataclass_type(f)
        if sub is not None:
            problems += _unknown_keys(v, sub, key + ".", where)
        item = _list_item_dataclass(f)
        if item is not None and isinstance(v, list):
            for i, el in enumerate(v):
                problems += _unknown_keys(el, item, f"{key}[{i}].", where)
        if item is not None and isinstance(v, dict):  # an item override: {index: {key: value}}
            for i, el in v.items():
                problems += _unknown_keys(el, item, f"{key}[{i}].", where)
    return problems


@functools.cache
def _ALL_KEYS() -> list[str]:  # noqa: N802
    keys = []
    for k, f in _schema_keys(Config).items():
        keys.append(k)
        item = _list_item_dataclass(f)
        if item is not None:
            keys += [f"{k}.{sub}" for sub in _schema_keys(item)]
    return keys


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and, depth first, the files it extends (later ones win)."""
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        loaded = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except Exception as e:  # yaml errors come in several classes
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line
        raise ConfigError(f"config file {path} is not valid YAML: {detail}") from None
    data = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, _read_yaml(path.parent / parent, (*chain, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` wins; nested dicts merge key by key; anything else (lists included) is replaced.

    The one merge of plain dicts: YAML inheritance, command-line overrides and ``deepspeed.extra``
    over the derived DeepSpeed config all use it. The result is a deep copy, so neither input is
    changed later through it (the DeepSpeed config is edited after the merge).
    """
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _index_overrides(over: dict, base: Any, cls: type, prefix: str, override: str) -> dict:
    """Rewrite list-item overrides into whole lists, so the merge sees a list it can validate.

    omegaconf parses both ``data.sources[0].path=x`` and ``data.sources.0.path=x`` into
    ``{'data': {'sources': {'0': {'path': 'x'}}}}``, a mapping it cannot merge into a list. For
    every list field, such a mapping is applied to the list as it stands so far (the
    files and earlier overrides, else the schema default): item 0 gets ``path=x`` merged in.
    Lists of plain values (``scrub.inputs.0=...``) work the same way, the item being replaced.
    Raises ConfigError for an index out of range or a non-index key.
    """
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(over)
    base = base if isinstance(base, dict) else {}
    for k, v in over.items():
        f = fields.get(str(k))
        if f is None or not isinstance(v, dict):
            continue
        key = f"{prefix}{k}"
        sub = _dataclass_type(f)
        if sub is not None:
            out[k] = _index_overrides(v, base.get(k), sub, key + ".", override)
        elif typing.get_origin(_type_of(f)) is list:
            default = f.default_factory()  # type: ignore[misc]
            current = base[k] if k in base else [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in default]
            if not isinstance(current, list):
                raise ConfigError(f"override '{override}': {key} is not a list here, so it has no item to change")
            items = copy.deepcopy(current)
            for idx, change in v.items():
                if not str(idx).isdigit():
                    raise ConfigError(f"override '{override}': {key} is a list; address one item by its index,"
                                      f" e.g. {key}[0].{idx}")
                i = int(idx)
                if i >= len(items):
                    raise ConfigError(f"override '{override}': index {i} is out of range; {key} has {len(items)}"
                                      f" item(s) (set the whole list to add one: {key}=[...])")
                both = isinstance(change, dict) and isinstance(items[i], dict)
                items[i] = deep_merge(items[i], change) if both else change
            out[k] = items
    return out


def _list_item_problems(node: Any, cls: type, prefix: str = "") -> list[str]:
    """Type errors inside list items, each named by its index (``data.sources[1].weight: ...``).

    A merge of a whole list reports a bad item value only by the field's own name (``weight``),
    so every item is first merged on its own into its section schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(node, dict):
        return []
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in node.items():
        f = fields.get(str(k))
        if f is None:
            continue
        key = f"{prefix}{k}"
        sub, item = _dataclass_type(f), _list_item_dataclass(f)
        if sub is not None:
            problems += _list_item_problems(v, sub, key + ".")
        elif item is not None and isinstance(v, list):
            for i, el in enumerate(v):
                if not isinstance(el, dict):
                    continue  # the whole merge names it: 'data.sources[0]: expected SourceConfig'
                try:
                    OmegaConf.merge(OmegaConf.structured(item), el)
                except OmegaConfBaseException as e:
                    problems.append(_omegaconf_problem(e, item, f"{key}[{i}]."))
    return problems


def _range_problems(obj: Any, prefix: str = "") -> list[str]:
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += _range_problems(value, key + ".")
            continue
        if isinstance(value, list):
            for i, el in enumerate(value):
                if dataclasses.is_dataclass(el):
                    problems += _range_problems(el, f"{key}[{i}].")
            continue
        m = f.metadata
        if value is None or isinstance(value, bool):
            continue
        if m.get("choices") and value not in m["choices"]:
            problems.append(f"{key}: expected one of {', '.join(map(str, m['choices']))}; got '{value}'")
        if isinstance(value, (int, float)):
            for bound, ok, word in (
                ("ge", lambda v, b: v >= b, ">="),
                ("gt", lambda v, b: v > b, ">"),
                ("le", lambda v, b: v <= b, "<="),
                ("lt", lambda v, b: v < b, "<"),
            ):
                b = m.get(bound)
                if b is not None and not ok(value, b):
                    problems.append(f"{key}: expected a value {word} {b}; got {value}")
    return problems


def _omegaconf_problem(e: Exception, cls: type = Config, prefix: str = "") -> str:
    """Turn an omegaconf validation error into 'key: expected X; got Y' (key = prefix + the
    error's key in the ``cls`` schema)."""
    import typing

    key = getattr(e, "full_key", None) or "?"
    value = getattr(e, "value", None)
    f = _schema_keys(cls).get(re.sub(r"\[\d+\]", "", key))
    key = prefix + key
    if f is not None and value is not None:
        t = _type_of(f)
        args = [a for a in typing.get_args(t) if a is not type(None)]
        expected = " or ".join(getattr(a, "__name__", str(a)) for a in (args or [t]))
        if args and type(None) in typing.get_args(t):
            expected += " or null"
        return f"{key}: expected {expected}; got {value!r} ({type(value).__name__})"
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    return f"{key}: {msg}"


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Load CONFIG.yaml (with its parents) plus dotlist overrides, validated, as a Config object.

    Raises ConfigError (exit status 2 at the CLI) naming every offending key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    user: dict = _read_yaml(Path(path)) if path is not None else {}
    where_file = f" (in {path})" if path is not None else ""
    problems = _unknown_keys(user, Config, "", where_file)

    over_dicts = []
    state = user  # the files plus the overrides so far: what a list-item override changes
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. model.n_layers=4)")
        try:
            od = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}' cannot be parsed: {e}") from None
        problems += _unknown_keys(od, Config, "", " (command-line override)")
        try:
            od = _index_overrides(od, state, Config, "", item)
        except ConfigError as e:
            problems += e.problems
            continue
        state = deep_merge(state, od)
        over_dicts.append(od)
    for d in () if problems else (user, *over_dicts):  # unknown keys are already reported
        problems += _list_item_problems(d, Config)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # an item kept by an override repeats

    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, user, *over_dicts)
        OmegaConf.resolve(merged)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_problem(e)) from None

    problems = _range_problems(cfg) + cross_field_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config into the run directory (atomically)."""
    return write_text_atomic(Path(run_dir) / name, to_yaml(cfg))


def reference_markdown() -> str:
    """The configuration reference of docs/configuration.md, generated from the schema."""
    lines: list[str] = []

    def section(cls: type, prefix: str, title_help: str) -> None:
        lines.append(f"\n#### `{prefix.rstrip('.')}` — {title_help}\n")
        lines.append("| key | default | meaning |")
        lines.append("|---|---|---|")
        subs = []
        for f in dataclasses.fields(cls):
            sub = _dataclass_type(f)
            if sub is not None:
                subs.append((sub, f"{prefix}{f.name}.", f.metadata.get("help", "")))
                continue
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            item = _list_item_dataclass(f)
            if item is not None:
                default = [dataclasses.asdict(x) for x in default]
            shown = "null" if default is None else repr(default).replace("|", "\\|")
            m = f.metadata
            rng = []
            for b, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if m.get(b) is not None:
                    rng.append(f"{w} {m[b]}")
            if m.get("choices"):
                rng.append("one of " + ", ".join(f"`{c}`" for c in m["choices"]))
            extra = f" ({'; '.join(rng)})" if rng else ""
            help_text = m.get("help", "").replace("|", "\\|")  # a bare | would end the table cell
            lines.append(f"| `{prefix}{f.name}` | `{shown}` | {help_text}{extra} |")
        for sub, p, h in subs:
            section(sub, p, h)

    for f in dataclasses.fields(Config):
        section(_dataclass_type(f), f.name + ".", f.metadata.get("help", ""))  # type: ignore[arg-type]
    return "\n".join(lines).lstrip("\n") + "\n"
