"""Every message that crosses a process boundary.

Each socket has its own tagged union (at the bottom), so a receiver decodes exactly the
types it accepts and drops anything else. Messages are batched per step: one `StepPlan`,
one `StepResult`, one `TokenBatch` per tokenizer and one `TextBatch` per frontend.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StructuredOutputs(msgspec.Struct, omit_defaults=True, kw_only=True):
    """vLLM's `StructuredOutputsParams`: one constraint the output must meet (exactly one field set)."""

    json: str | None = None  # a JSON schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # one of these strings, exactly
    grammar: str | None = None  # a Lark grammar, or GBNF (llama.cpp's, as vLLM takes it)
    # JSON without free whitespace (vLLM's flag): `{"a": 1, "b": [2, 3]}`, separators as json.dumps
    # writes them; a small model cannot pad its output with newlines until max_tokens.
    disable_any_whitespace: bool = False

    def constraints(self) -> list[str]:
        """The names of the constraints set (a valid request has exactly one)."""
        named = {"json": self.json, "regex": self.regex, "choice": self.choice, "grammar": self.grammar}
        return [name for name, value in named.items() if value is not None] + (["json_object"] * self.json_object)


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """How to sample one request; the same object is the offline API's `SamplingParams`."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's (but the first) and the k most likely
    logit_bias: dict[int, float] = {}
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    # Set by the tokenizer, not by clients: `structured_outputs` compiled to an llguidance grammar
    # (checked against the vocabulary); the worker's token masks follow it.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens so far (the penalties do)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None = None
    # An assistant's earlier tool calls, as chat templates read them: {"id", "type": "function",
    # "function": {"name", "arguments": <the arguments as an object>}}.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template's `messages` entry (fields not given left out)."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None or k == "content"}


# ---- pool membership -------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True):
    """A pool member introducing itself to a hub (again after every restart)."""

    role: str  # "tokenizer" | "worker" | "draft" (a draft-model worker: num_blocks 0 until set up)
    member_id: str
    pid: int
    rank: int = 0
    capacity: int = 0
    # Filled by a worker once its model is loaded: what the scheduler must size itself on.
    num_blocks: int = 0
    max_model_len: int = 0
    eos_token_ids: list[int] = []
    max_num_batched_tokens: int = 0  # the step budget, resolved for the worker's device
    # The model's embedding rows: the scheduler refuses token ids outside them, which would
    # crash the worker (0: not said, only negative ids are refused).
    vocab_size: int = 0
    group: int = 0  # a worker's group: the model replica (data parallel) its rank belongs to


def worker_id(group: int, rank: int) -> str:
    """A worker's member id (its socket identity): worker-R in group 0, worker-gG-R in group G."""
    return f"worker-{rank}" if group == 0 else f"worker-g{group}-{rank}"


def draft_worker_id(group: int) -> str:
    """A draft-model worker's member id: worker-draft-G, proposing for worker group G (a
    `worker*` identity: it holds the worker role's CURVE key)."""
    return f"worker-draft-{group}"


class KVGrid(msgspec.Struct, array_like=True):
    """One worker group's KV blocks for the engine view, downsampled: cell i stands for blocks
    [i * blocks_per_cell, (i + 1) * blocks_per_cell) (the last cell may hold fewer)."""

    num_blocks: int
    blocks_per_cell: int
    used: list[int]  # per cell: blocks held by a request
    cached: list[int]  # per cell: blocks nobody holds whose contents are cached (a later request may reuse them)


class GroupView(msgspec.Struct, omit_defaults=True):
    """One worker group for the engine view."""

    group: int
    state: str  # "serving" | "draining" | "lost" (had served, now missing ranks) | "starting"
    size: int  # its tensor-parallel ranks
    ranks: list[str] = []  # member ids of the ranks connected now, by rank
    pids: list[int] = []
    restarts: dict[str, int] = {}  # member id -> hellos with a new pid (by the scheduler's count)
    running: int = 0
    waiting: int = 0
    kv: KVGrid | None = None  # None while the group has no KV pool (no scheduler yet)


class EngineView(msgspec.Struct):
    """What `/engine` draws beyond `SchedulerStats`; built only while a frontend watches (`Watch`)."""

    seq: int  # numbered per scheduler: tokenizers pass each view on more than once
    scheduler_id: str
    groups: list[GroupView]
    # (prefill, decode) tokens of each step planned since the previous view, oldest first.
    steps: list[tuple[int, int]] = []


class SchedulerStats(msgspec.Struct, tag=True):
    """The scheduler's figures for `/metrics`; counters are totals since the scheduler started."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_preemptions: int = 0
    num_steps: int = 0
    # The worker's seconds spent running steps, and waiting for its next step while the
    # scheduler had work: the idle fraction is idle / (idle + busy) over a run.
    worker_busy_s: float = 0.0
    worker_idle_s: float = 0.0
    # Requests the scheduler holds any state for (samples, and the parent of n > 1 samples,
    # finished or not): 0 when idle, or a request's state was left behind.
    num_held: int = 0
    # While a frontend watches (`Watch`): the engine view; and how many views were built since
    # start (stays 0 while nobody watches: the view costs nothing then).
    engine_view: EngineView | None = None
    num_engine_views: int = 0
    # Speculative decoding (vLLM's spec_decode counters): requests that ran with drafts, draft
    # tokens scheduled, drafts kept, and drafts kept at each draft position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []


class Heartbeat(msgspec.Struct, tag=True):
    member_id: str
    load: int = 0
    ready: bool = False  # the member can take requests (a tokenizer: it knows the engine's limits)
    # A tokenizer passes on the latest scheduler figures it has, so the frontend needs no
    # socket to the scheduler.
    stats: SchedulerStats | None = None
    # A tokenizer: requests run now (a worker group is attached), not just wait for one.
    serving: bool = False
    max_model_len: int = 0  # a tokenizer: the engine's context, once known (0: not yet)
    # A worker that got SIGTERM on its own (a scaled-down service): its group takes no new
    # request, ends its running ones, and is then told to stop.
    draining: bool = False


class Watch(msgspec.Struct, tag=True):
    """Frontend -> every tokenizer -> scheduler: a client watches `/engine/stream`; build an
    `EngineView` into the stats for the next `ttl_s` seconds. Sent again every second while
    watched, so a watcher that goes (or a frontend that dies) stops it without a message."""

    ttl_s: float = 3.0


class EngineReady(msgspec.Struct, tag=True):
    """Scheduler -> tokenizers: the limits to check requests against, and whether they run now.

    Sent when a worker group attaches (serving) and again when it is lost (not serving): the
    requests then wait, and run again once a worker is back.
    """

    max_model_len: int
    num_blocks: int
    block_size: int
    eos_token_ids: list[int] = []
    serving: bool = True
    # Unique to one scheduler process: a tokenizer that reconnected tells a restarted scheduler,
    # which lost every request, from the same one after a dropped connection.
    scheduler_id: str = ""


# ---- requests --------------------------------------------------------------------------


class TokenizeRequest(msgspec.Struct, tag=True, omit_defaults=True):
    """Frontend -> tokenizer: one request, text or token ids, completion or chat."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    arrival_time: float = 0.0
    continue_final_message: bool = False  # chat: extend the last (assistant) message
    tools: list[dict[str, Any]] | None = None  # chat: OpenAI's tool definitions, for the template
    echo: bool = False  # send the prompt's text back in the first output's `prompt_text`
    # Sent again because its tokenizer died: the scheduler hands the new one the request and
    # its tokens so far, and the frontend drops what its client already has.
    resume: bool = False


class EngineRequest(msgspec.Struct, tag=True):
    """Tokenizer -> scheduler: a tokenized request; `reply_to` is the tokenizer's id."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_to: str
    arrival_time: float = 0.0
    # The request may already run (its tokenizer died): adopt it, and send `reply_to` every
    # output token so far; a request the scheduler does not hold starts as new.
    resume: bool = False
    # Re-submitted to a restarted scheduler, which lost every request: each sample's output
    # tokens so far, by index, to continue from as after a preemption (empty: none yet).
    output_token_ids: list[list[int]] = []
    # Samples (n > 1) that already finished, by index, with their finish reason: not run again.
    finished_samples: dict[int, str] = {}
    # The `EngineReady.scheduler_id` it was sent to: another scheduler drops it (sent to its dead
    # predecessor, it arrives through the reconnected socket; the tokenizer re-submits it). "": any.
    scheduler_id: str = ""


class Abort(msgspec.Struct, tag=True):
    """Stop requests (client gone, stop string hit); travels frontend -> tokenizer -> scheduler."""

    request_ids: list[str]
    reason: str = "abort"  # "stop" when the tokenizer found a stop string
    # With n > 1: stop only sample `indices[k]` of `request_ids[k]`; None stops every sample.
    indices: list[int] | None = None


class ErrorReply(msgspec.Struct, tag=True):
    """A request that cannot be served, answered to the frontend as OpenAI's error JSON."""

    request_id: str
    status: int
    message: str
    error_type: str = "invalid_request_error"
    param: str | None = None


# ---- frontend <-> tokenizer: /tokenize and /detokenize (a round trip, nothing runs) ------


class TokenizeOnlyRequest(msgspec.Struct, tag=True, omit_defaults=True):
    """Frontend -> tokenizer (/tokenize): a prompt's or a chat's token ids, as a generation request
    would get them; answered with a `TokenizeOnlyReply`, or an `ErrorReply` of the same id."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None  # a chat's tool definitions, as the template shows them


class TokenizeOnlyReply(msgspec.Struct, tag=True):
    request_id: str
    tokens: list[int]
    max_model_len: int
    token_strs: list[str] | None = None  # each token as the vocabulary spells it


class DetokenizeRequest(msgspec.Struct, tag=True):
    """Frontend -> tokenizer (/detokenize): token ids to text; a `DetokenizeReply` or `ErrorReply`."""

    request_id: str
    tokens: list[int]


class DetokenizeReply(msgspec.Struct, tag=True):
    request_id: str
    prompt: str


# ---- scheduler <-> worker --------------------------------------------------------------


class NewRequestData(msgspec.Struct, array_like=True):
    """A request the worker has not seen: all it needs to prefill it."""

    request_id: str
    prompt_token_ids: list[int]  # after a preemption: the prompt and the outputs so far
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # How many of `prompt_token_ids` are outputs (a resumed request): penalties, min_tokens
    # and per-position seeds count outputs only.
    num_output_tokens: int = 0


class CachedRequestData(msgspec.Struct, array_like=True):
    """A running request: only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class StepPlan(msgspec.Struct, tag=True):
    """Scheduler -> worker, once per step. Never whole histories, only differences."""

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    finished_request_ids: list[str]
    # (source, destination) KV blocks to copy before the step runs: copy-on-write of the
    # partial prompt block a parallel sample (n > 1) starts from.
    block_copies: list[tuple[int, int]] = []
    # Speculative decoding: a request's draft tokens, scheduled after its last token (its
    # num_scheduled_tokens is 1 + len(drafts)); its result rows are the kept drafts and one
    # more token, the request's id repeated on consecutive rows.
    spec_token_ids: dict[str, list[int]] = {}


class StepResult(msgspec.Struct, tag=True):
    """Worker -> scheduler: the token sampled for each request that completed a position.

    A request in the middle of a chunked prefill samples nothing and is not listed.
    """

    step_id: int
    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[float] | None = None  # per row: log p(chosen token) under the raw logits
    # Per row, when any row asked for logprobs: the k most likely token ids and their logprobs,
    # best first, k being the largest `logprobs` asked for in the step.
    top_logprob_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    # By request id, for requests with `prompt_logprobs` whose prompt positions this step computed.
    prompt_logprobs: dict[str, PromptLogprobs] | None = None
    # The worker's clock: seconds it waited between finishing its previous step and starting
    # this one, and seconds this step took (how `pagoda bench` measures the worker's idle time).
    idle_s: float = 0.0
    execute_s: float = 0.0


class Shutdown(msgspec.Struct, tag=True):
    reason: str = ""


# ---- scheduler <-> draft-model worker (speculative decoding, method "draft_model") ------------


class DraftSetup(msgspec.Struct, tag=True):
    """Scheduler -> draft worker, answering its first hello: the target's KV pool, whose block
    ids the draft's own cache mirrors (one block table per request, the scheduler's)."""

    num_blocks: int
    max_model_len: int
    vocab_size: int


class DraftRequest(msgspec.Struct, array_like=True):
    """One request to draft for: its known tokens, how many of them the draft's cache holds
    (the rest it computes first: the catch-up), its block table, and how many drafts."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    num_drafts: int


class DraftPlan(msgspec.Struct, tag=True):
    """Scheduler -> draft worker: the requests of target step `step_id` that get drafts."""

    step_id: int
    requests: list[DraftRequest]


class DraftResult(msgspec.Struct, tag=True):
    """Draft worker -> scheduler: each request's greedy drafts (as many as asked)."""

    step_id: int
    drafts: dict[str, list[int]]
    execute_s: float = 0.0


# ---- scheduler -> tokenizer -> frontend ------------------------------------------------


class Logprobs(msgspec.Struct, array_like=True):
    """Logprobs of a run of new tokens, one entry per token, for a request that asked for them.

    The scheduler fills the numbers; the tokenizer adds each token decoded on its own.
    """

    token_logprobs: list[float]  # log p(the sampled token)
    top_token_ids: list[list[int]]  # the request's `logprobs` most likely tokens, best first
    top_logprobs: list[list[float]]
    tokens: list[str] = []  # the sampled tokens as text
    top_tokens: list[list[str]] = []


class PromptLogprobs(msgspec.Struct, array_like=True):
    """vLLM's prompt logprobs of a run of prompt tokens: entry i is about prompt token `first + i`
    (`first` >= 1: the first prompt token has none), under the raw logits of the positions before.

    The worker fills the numbers per prefill chunk, the scheduler joins a request's chunks and
    sends the whole prompt's with its first output, the tokenizer adds the texts.
    """

    first: int
    token_logprobs: list[float]  # log p(the prompt token)
    token_ranks: list[int]  # its rank in the vocabulary (1: the most likely)
    top_token_ids: list[list[int]]  # the request's `prompt_logprobs` most likely tokens, best first
    top_logprobs: list[list[float]]
    prompt_token_ids: list[int] = []  # the tokenizer's: every prompt token (from position 0)
    prompt_tokens: list[str] = []  # and its text, decoded alone
    top_tokens: list[list[str]] = []


class TokenOutput(msgspec.Struct, array_like=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    index: int = 0  # which of the request's `n` parallel samples
    logprobs: Logprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None  # the whole prompt's, with sample 0's first output


class TokenBatch(msgspec.Struct, tag=True):
    """Scheduler -> one tokenizer, once per step: every new token of the requests it owns."""

    outputs: list[TokenOutput]


class TextOutput(msgspec.Struct, array_like=True):
    request_id: str
    text: str  # the new text since the previous output of this request
    token_ids: list[int]  # the new token ids
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    index: int = 0  # which of the request's `n` parallel samples
    logprobs: Logprobs | None = None  # of `token_ids`, when the request asked for them
    # vLLM's stop_reason: the stop string or stop token id that finished it (None for EOS).
    stop_reason: str | int | None = None
    prompt_text: str | None = None  # the first output of a request with `echo`
    prompt_logprobs: PromptLogprobs | None = None  # with sample 0's first output, when asked for


class TextBatch(msgspec.Struct, tag=True):
    """Tokenizer -> frontend, once per step."""

    outputs: list[TextOutput]


# ---- the union each socket accepts: what its `protocol.sockets.Decoder` is built on ----

FrontendInbound = Hello | Heartbeat | TextBatch | ErrorReply | TokenizeOnlyReply | DetokenizeReply
TokenizerFromFrontend = TokenizeRequest | Abort | Shutdown | TokenizeOnlyRequest | DetokenizeRequest | Watch
TokenizerFromScheduler = TokenBatch | EngineReady | ErrorReply | SchedulerStats | Shutdown
SchedulerInbound = Hello | Heartbeat | EngineRequest | Abort | StepResult | Watch | DraftResult
WorkerInbound = StepPlan | Shutdown
DraftWorkerInbound = DraftSetup | DraftPlan | Shutdown
