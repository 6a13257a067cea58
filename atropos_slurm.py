"""atropos-slurm: find the LLM inference servers of a Slurm job and spread OpenAI requests over them.

An Atropos-style RL job on Slurm trains on its first ``NUM_TRAINING_NODES`` nodes and runs
OpenAI-compatible inference servers (vLLM, SGLang, TGI, llama.cpp) on the rest, on ports
9000, 9001, ... (``gpus_per_node // INFER_TP`` of them per node).  This module

* discovers those servers from ``SLURM_JOB_NODELIST`` and the GPUs the job got, also in a
  heterogeneous job, for servers spanning nodes, or from a list (``discover_servers``),
* dispatches async chat/completion requests over them, round-robin, capped, with health
  tracking and bounded retries (``ServerManager``, drop-in for Atropos' class of that name),
* watches the servers of one inference node and logs their health to Weights & Biases or
  JSON lines (``run_watcher``, ``inference_watcher.py``).

Standard library only (``wandb`` is optional and imported lazily): copying this file onto a
cluster is a supported install.  The sections follow the data; each begins with a banner:

=================  ==========================================================================
Errors             every exception raised on purpose (``AtroposSlurmError`` and below)
Hostlists          Slurm's bracket grammar, pure (``expand_hostlist``)
Discovery          allocation (nodelists, GPUs, het components) or a server list -> ``Layout``,
                   server URLs; scontrol through an argument list
Config             ``ServerBaseline`` / ``APIServerConfig``, validated on construction; the
                   manager's knobs (``manager_knobs``: argument, else ``ATROPOS_SLURM_*``);
                   the settings' checks every variable, flag, field and knob goes through
HTTP protocol      pure functions over bytes: request heads, response heads, body framing
                   (``LengthBody``, ``ChunkedBody``, ``UntilCloseBody``), SSE
HTTP I/O           deadlines, the keep-alive ``ConnectionPool`` per server, a bounded one-shot GET;
                   ``_io_error``: the one translation of socket and stream errors;
                   ``_unread_bytes``: the one read of ``StreamReader``'s private state
Server             ``OpenAIServer``: one HTTP request per call, responses, ``EventStream``
Health probes      ``probe_http``, ``HealthProber``, ``wait_for_servers``; ``EndpointFallback``:
                   a server's alternative endpoints, learnt from 404s (a capability, no retry)
Slots              ``Slots``: the dispatch state (a ``ServerSlot`` per server: health, in
                   flight and caps per split), the waiters, ``select`` (which server)
Routing            ``PrefixRouter``: the server a request would like (where its prompt's prefix
                   is cached), learnt from requests and answers, within a load bound
Retry policy       ``RetryPolicy.decide`` (raise, resend or retry, mark down, delay),
                   ``Attempts`` (one request's count, obeyed), ``RetryBudget`` (across calls)
Manager            ``ServerManager``: a ``Call`` value per request, slots from a ``SlotSource``;
                   ``_request`` chooses a slot, calls the server, obeys the retry decision
Managed server     ``managed_server``, ``tokens_and_logprobs_completion``, ``get_logprobs``: the
                   exact token ids and logprobs of each ``server_type``'s protocol, every answer
                   checked by a ``TokenReader`` before use
Atropos compat     ``patch_atropos``: atroposlib's ``BaseEnv`` builds ours; its arguments
                   (``resolve_servers``: discovers at most once), reasoning settings,
                   ``testing=True``, ``DedicatedServer``
Stub server        a model-less OpenAI server for the demo, tests and benchmarks; its token
                   protocols (``StubTokens``) for dry runs of ``managed_server`` environments
Watcher            per inference node: probes -> W&B or JSON lines
CLI                ``python -m atropos_slurm discover|hostnames|wait|watch|stub-server|run-env|demo``
=================  ==========================================================================

Where to change: how a server is chosen, ``Slots.select``; which failures are retried and how
long to wait, ``RetryPolicy.decide``; how many times, ``Attempts`` (``max_retries`` per call)
and ``RetryBudget`` (across calls); what a job can configure, the discovery variables
(``discover_servers``) and ``MANAGER_KNOBS``.

Process-wide state (everything else belongs to an object): ``_HEADER_LINES`` (HTTP protocol:
parsed header lines, at most 512, then emptied), ``_OUTBOXES`` (HTTP I/O: each event loop's
requests of one iteration, until its end), the compact JSON encoder's circular-reference
marks (``_json_compact``: empty between calls, emptied by an error), and the testing stub
server (Atropos compat: ``testing_stub_url``, a daemon thread for the life of the process).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.parse
import warnings
from collections import OrderedDict, deque
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple


class _LazyModule:
    """A module imported on its first use, which then takes this stand-in's place in our globals.

    ``import atropos_slurm`` must stay fast (bench/bench_import.py) for what needs no event
    loop: discovery, the CLI's ``discover``/``hostnames``, scripts that only build configs.
    asyncio (with the ssl, socket, concurrent.futures and inspect it loads) was half of the
    import, so it and socket are loaded when code first touches ``asyncio.<name>``/``socket.<name>``.
    Modules with a single use (subprocess, ssl, uuid, runpy, email.utils) are imported in the
    function that uses them instead.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


asyncio: Any = _LazyModule("asyncio")
socket: Any = _LazyModule("socket")

__version__ = "0.1.0"
__all__ = [
    # errors
    "AtroposSlurmError", "ConfigError", "HostlistError", "ServerError", "ServerConnectionError",
    "StaleConnectionError", "ServerTimeoutError", "ProtocolError", "ResponseTooLargeError",
    "GenerationAbortedError", "APIStatusError", "StreamError", "NoHealthyServerError", "ManagerClosedError",
    "TokenProtocolError", "ManagedServerUnsupportedError",
    # discovery and config
    "expand_hostlist", "resolve_hostnames", "discover_servers", "server_layout", "Layout", "Discovery", "ServerAddress",
    "ServerBaseline", "APIServerConfig", "configs_for_urls",
    # dispatch
    "ServerManager", "OpenAIServer", "RequestStats", "APIResponse", "EventStream", "Slots", "ServerSlot",
    "SlotSource", "SharedSlots", "Call", "TokenCall", "RetryPolicy", "Retry", "Attempts", "RetryBudget",
    "EndpointFallback", "HealthProber", "wait_for_servers", "StubServer", "StubTokens", "ManagerKnobs", "manager_knobs",
    # exact tokens and logprobs
    "ManagedServer", "DummyManagedServer", "SequenceNode", "TokensProtocol", "TOKEN_PROTOCOLS", "TokenReader",
    # Atropos compatibility
    "patch_atropos", "run_env", "DedicatedServer", "resolve_servers",
    # watcher and CLI
    "WatcherOptions", "watch", "run_watcher", "main", "watcher_parser",
]

log = logging.getLogger("atropos_slurm")


# =============================================================================================
# Errors
# =============================================================================================


class AtroposSlurmError(Exception):
    """Root of every error this module raises on purpose."""


class ConfigError(AtroposSlurmError, ValueError):
    """The user's configuration is wrong: an environment variable, a flag or a config field."""


class HostlistError(ConfigError):
    """A Slurm hostlist is malformed (or scontrol rejected it)."""


class ServerError(AtroposSlurmError):
    """A remote server failed or misbehaved; ``url`` names it."""

    attempts = 1  # how many HTTP requests the failed call made (set by ServerManager)

    def __init__(self, message: str, url: str = ""):
        super().__init__(f"{url}: {message}" if url else message)
        self.url = url

    def after_attempts(self, attempt: int, most: int) -> "ServerError":
        """Say in the message how many requests were made, when more than one."""
        self.attempts = attempt
        if attempt > 1:
            self.args = (f"{self.args[0]} (attempt {attempt} of at most {most})",)
        return self


class ServerConnectionError(ServerError):
    """The server could not be reached, or closed or reset the connection."""


class StaleConnectionError(ServerConnectionError):
    """A reused keep-alive connection ended before any response byte, most likely closed by
    the server while idle: worth resending at once, and no sign that the server is down."""


class ServerTimeoutError(ServerError):
    """The server did not answer within the configured timeout."""


class ProtocolError(ServerError):
    """The server's bytes are not valid HTTP/1.x or SSE, or exceed a size limit."""


class ResponseTooLargeError(ProtocolError):
    """A response body is larger than the client accepts (``MAX_BODY_BYTES``)."""


class GenerationAbortedError(ServerError):
    """The server answered 200 but aborted the generation (``finish_reason: "abort"``).

    vLLM does this on ``/abort_requests`` and ``/pause`` (before a weight update) and while
    shutting down; the partial text must not pass for a finished rollout, so it is retried.
    """


class APIStatusError(ServerError):
    """The server answered with a non-2xx status; carries the status and the server's message."""

    def __init__(self, status: int, message: str, url: str = "", retry_after: Optional[float] = None):
        super().__init__(f"HTTP {status}: {message}", url)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class StreamError(ServerError):
    """The server reported an error inside a stream (``data: {"error": ...}``, as vLLM and SGLang
    do when a generation fails after the first event): the text so far is not a finished answer."""


class ManagerClosedError(AtroposSlurmError):
    """A call was made on a ``ServerManager`` after ``close()``."""


class NoHealthyServerError(ServerError):
    """No server became healthy before the deadline; the message lists each one's last failure."""


class TokenProtocolError(ServerError):
    """A 2xx token answer lacks the token ids or logprobs its protocol promises (a wrong
    ``server_type``?), or holds ones no trainer can trust: counts that disagree, ids or logprobs
    of the wrong type or range, a missing finish reason (``TokenReader``).

    Not retried, and the server not marked down: the same server would answer the same way.
    """


class ManagedServerUnsupportedError(ConfigError, NotImplementedError):
    """This ``server_type`` gives no token ids and logprobs (Atropos raised ``NotImplementedError``)."""


def _shown(value: Any, limit: int = 60) -> str:
    """A user's value quoted for a one-line error message: ``repr``, cut to ``limit`` characters.

    An integer of thousands of digits is described instead (its ``repr`` raises from 3.11 on).
    """
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# =============================================================================================
# Hostlists: Slurm's bracket grammar, expanded in pure Python (no I/O)
# =============================================================================================

HOSTLIST_SEPARATORS = ", \t\n"
MAX_RANGE_NAMES = 65536  # Slurm's MAX_RANGE: n[1-65537] is rejected
# Bounds on a whole expansion, counted before any name is built, so that a typo or a hostile
# list (6 KB of n[1-65536]n[1-65536]...) is one error line, not gigabytes.  The largest Slurm
# clusters have about 10,000 nodes; 262,144 names take about 20 MB and a quarter of a second.
MAX_HOSTLIST_NAMES = 1 << 18
MAX_RANGE_DIGITS = 18  # a range bound fits 64 bits, as Slurm's strtoul needs
_HOSTNAME_CHARS = re.compile(r"[A-Za-z0-9._-]+\Z")
_RANGE_PART = re.compile(r"([0-9]+)(?:-([0-9]+))?\Z")  # ASCII only: \d would take '٣' and scontrol does not
_Range = Tuple[int, int, int]  # low, high, width (zero padding)


def expand_hostlist(text: str) -> List[str]:
    """Expand a Slurm hostlist exactly as ``scontrol show hostnames`` does.

    Separators are comma, space, tab and newline; ``prefix[1-3,7,09-11]`` ranges zero-pad to the
    width of their low bound; several bracket groups expand as a cartesian product in Slurm's
    own order; duplicates and order are kept.  A suffix after ``]`` (``n[1-2]-ib``, Slurm
    23.02.5+) is accepted.  Invalid input raises ``HostlistError`` quoting the bad part, where
    scontrol would print garbage (``node[1-`` gives ``node]``); so does a list of more than
    ``MAX_HOSTLIST_NAMES`` names, found out before any name is built.
    """
    tokens = parse_hostlist(text)
    check_hostlist_size(tokens, text)
    names: List[str] = []
    for literals, groups in tokens:
        names.extend(_expand_token(literals, groups))
    return names


def parse_hostlist(text: str) -> List[Tuple[List[str], List[List[_Range]]]]:
    """Check a hostlist's syntax; per token, its literals and its bracket groups' ranges."""
    if not isinstance(text, str):
        raise HostlistError(f"hostlist must be a string, not {type(text).__name__}")
    tokens = [_parse_token(token) for token in _split_hostlist(text)]
    if not tokens:
        raise HostlistError(f"hostlist {text!r} is empty")
    return tokens


def check_hostlist_size(tokens: List[Tuple[List[str], List[List[_Range]]]], text: str) -> None:
    """Refuse a parsed hostlist of more than ``MAX_HOSTLIST_NAMES`` names, counted, not built."""
    total = 0
    for _, groups in tokens:
        size = 1
        for ranges in groups:
            size *= sum(high - low + 1 for low, high, _ in ranges)
            if size > MAX_HOSTLIST_NAMES:  # stop before the product grows huge
                break
        total += size
        if total > MAX_HOSTLIST_NAMES:
            raise HostlistError(f"hostlist {_shown(text)} expands to more than {MAX_HOSTLIST_NAMES} names")


def _split_hostlist(text: str) -> List[str]:
    """Split at top-level separators; separators inside brackets belong to the ranges."""
    tokens, start, depth = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise HostlistError(f"nested '[' in hostlist {text!r} at {text[start:i + 1]!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise HostlistError(f"']' without '[' in hostlist {text!r} at {text[start:i + 1]!r}")
            depth = 0
        elif ch in HOSTLIST_SEPARATORS and not depth:
            tokens.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unclosed '[' in hostlist {text!r} at {text[start:]!r}")
    tokens.append(text[start:])
    return [t for t in tokens if t]


def _parse_token(token: str) -> Tuple[List[str], List[List[_Range]]]:
    """``a[1-2]b[3-4]c`` -> (['a', 'b', 'c'], [[(1, 2, 1)], [(3, 4, 1)]])."""
    pieces = re.split(r"\[([^\]]*)\]", token)  # literal, group, literal, group, ..., literal
    literals, groups = pieces[0::2], [_parse_ranges(g, token) for g in pieces[1::2]]
    for literal in literals:
        if literal and not _HOSTNAME_CHARS.match(literal):
            raise HostlistError(f"invalid character in host name {token!r}")
    if token.startswith("-"):
        raise HostlistError(f"host name {token!r} starts with '-'")
    return literals, groups


def _parse_ranges(spec: str, token: str) -> List[_Range]:
    """``1-3,7,09-11`` -> [(1, 3, 1), (7, 7, 1), (9, 11, 2)]; each range at most ``MAX_RANGE_NAMES`` long."""
    ranges = []
    for part in spec.split(","):
        m = _RANGE_PART.match(part)
        if not m:
            raise HostlistError(f"invalid range {part!r} in {token!r} (digits and 'a-b' only)")
        if max(len(m.group(1)), len(m.group(2) or "")) > MAX_RANGE_DIGITS:
            raise HostlistError(f"range {_shown(part)} in {_shown(token)} has a bound of more than "
                                f"{MAX_RANGE_DIGITS} digits")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if low > high:
            raise HostlistError(f"reversed range {part!r} in {token!r}")
        if high - low + 1 > MAX_RANGE_NAMES:
            raise HostlistError(f"range {part!r} in {token!r} has more than {MAX_RANGE_NAMES} names")
        ranges.append((low, high, len(m.group(1))))
    return ranges


def _expand_token(literals: List[str], groups: List[List[_Range]]) -> List[str]:
    """The names of one parsed token, e.g. ``a[1-2]b[3-4]c``.

    Slurm's loop order (measured with scontrol 22.05): the last bracket group varies fastest,
    the one before it slowest, then the earlier groups from right to left:
    ``a[1-2]b[3-4]c[5-6]`` gives a1b3c5 a1b3c6 a2b3c5 a2b3c6 a1b4c5 ...
    """
    if not groups:
        return [literals[0]]
    values = [[f"{n:0{width}d}" for low, high, width in ranges for n in range(low, high + 1)] for ranges in groups]
    order = list(range(len(groups) - 2, -1, -1)) + [len(groups) - 1]
    names = []
    for combo in itertools.product(*(values[i] for i in order)):
        picked = [""] * len(groups)
        for value, i in zip(combo, order):
            picked[i] = value
        names.append("".join(lit + val for lit, val in zip(literals, picked)) + literals[-1])
    return names


# =============================================================================================
# Discovery: the allocation (nodelists, GPUs per node, heterogeneous components) or a server list -> URLs
# =============================================================================================

DEFAULT_GPUS_PER_NODE = 8
DEFAULT_BASE_PORT = 9000
SCONTROL_TIMEOUT = 10.0  # a SLURM_CONF naming a missing file makes scontrol retry for 60 s
HOSTLIST_BACKENDS = ("auto", "scontrol", "python")
ENV_HOSTLIST_BACKEND = "ATROPOS_SLURM_HOSTLIST"
ENV_GPUS_PER_NODE = "ATROPOS_SLURM_GPUS_PER_NODE"
ENV_BASE_PORT = "ATROPOS_SLURM_BASE_PORT"
ENV_SERVERS = "ATROPOS_SLURM_SERVERS"
ENV_INFERENCE_HET_GROUP = "ATROPOS_SLURM_INFERENCE_HET_GROUP"
MAX_SERVERS = 1 << 18  # URLs from one discovery; 10,000 nodes of 8 servers is about 80,000
MAX_GPUS_PER_NODE = 4096
MAX_HET_GROUPS = 1024  # components of one heterogeneous job; Slurm's own limit is 128 by default
MAX_SERVER_LIST_BYTES = 16 << 20  # an ATROPOS_SLURM_SERVERS=@file: 262,144 URLs of 64 bytes


class ScontrolUnavailable(Exception):
    """scontrol is missing or cannot run here (no slurm.conf, timeout): internal, for fallback."""


def scontrol_hostnames(text: str, scontrol: str = "scontrol", timeout: float = SCONTROL_TIMEOUT) -> List[str]:
    """Expand ``text`` with ``scontrol show hostnames``, through an argument list, never a shell.

    scontrol exits 0 on invalid input, so anything on stderr, or an empty stdout for a
    non-empty list, is a failure; scontrol's own message is surfaced.  Every name it prints is
    checked too, because some malformed lists come back as garbage on stdout.
    """
    import subprocess  # lazily: see _LazyModule
    text = text.strip()
    if text.startswith("-"):
        raise HostlistError(f"hostlist {text!r} starts with '-'")
    try:
        proc = subprocess.run(  # scontrol keeps a newline inside a name: 'a\nb[1-2]' gives a b1 a b2
            [scontrol, "show", "hostnames", "--", text.replace("\n", ",")],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
    except FileNotFoundError as e:
        raise ScontrolUnavailable(f"{scontrol} not found") from e
    except subprocess.TimeoutExpired as e:
        raise ScontrolUnavailable(f"{scontrol} did not answer within {timeout:g} s") from e
    except OSError as e:
        raise ScontrolUnavailable(f"{scontrol} cannot run: {e}") from e
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    stderr = " ".join(lines)
    if proc.returncode != 0:
        raise ScontrolUnavailable(f"{scontrol} exited {proc.returncode}: {lines[-1] if lines else 'no message'}")
    names = proc.stdout.split()
    if stderr or not names:
        raise HostlistError(f"scontrol rejected hostlist {text!r}: {stderr or 'no host names printed'}")
    for name in names:
        if not _HOSTNAME_CHARS.match(name) or name.startswith("-"):
            raise HostlistError(f"scontrol expanded hostlist {text!r} to an invalid name {name!r}")
    return names


def resolve_hostnames(text: str, backend: str = "auto") -> Tuple[List[str], str]:
    """Expand a hostlist with the chosen backend; return the names and the backend used.

    ``auto`` uses scontrol when it is on PATH and works, and falls back to the Python expander
    (saying so in a log line) when it is missing or cannot run, e.g. without a slurm.conf.
    """
    if backend not in HOSTLIST_BACKENDS:
        raise ConfigError(f"hostlist backend {backend!r} is not one of {', '.join(HOSTLIST_BACKENDS)}")
    if backend == "python":
        return expand_hostlist(text), "python"
    if not isinstance(text, str) or not text.strip():
        return expand_hostlist(text), "python"  # raises: not a string, or empty
    try:
        tokens = parse_hostlist(text)
    except HostlistError:
        pass  # scontrol judges the syntax: it takes ' 1' and '+1' in ranges, which we refuse
    else:
        check_hostlist_size(tokens, text)  # before scontrol prints millions of names
    try:
        return scontrol_hostnames(text), "scontrol"
    except ScontrolUnavailable as e:
        if backend == "scontrol":
            raise ConfigError(f"hostlist backend 'scontrol' was requested but {e}") from None
        log.warning("scontrol unavailable (%s); expanding the hostlist in Python", e)
        return expand_hostlist(text), "python"


_GPU_COUNT = re.compile(r"(?:gpu:)?(?:[A-Za-z0-9_.-]+:)?([0-9]{1,9})\Z")  # '4', 'h100:4', 'gpu:h100:4'


def het_size(env: Dict[str, str]) -> int:
    """The number of components of a heterogeneous job (``SLURM_HET_SIZE``, which must be set), checked."""
    return _int_setting("SLURM_HET_SIZE", env["SLURM_HET_SIZE"], minimum=1, maximum=MAX_HET_GROUPS)


def parse_gpus_per_node(name: str, text: str) -> int:
    """Slurm's GPUs per node in the forms it writes: ``4``, ``h100:4``, ``gpu:h100:4``; several
    types (``h100:4,a100:2``, from ``--gpus-per-node=h100:4,a100:2``) add up."""
    total = 0
    for part in text.split(","):
        m = _GPU_COUNT.match(part.strip())
        if not m:
            raise ConfigError(f"{name}={_shown(text)} is not a GPU count such as 4, h100:4 or h100:4,a100:2")
        total += int(m.group(1))
    if not 1 <= total <= MAX_GPUS_PER_NODE:
        raise ConfigError(f"{name}={_shown(text)} must give 1 to {MAX_GPUS_PER_NODE} GPUs per node "
                          f"(set {ENV_GPUS_PER_NODE} for a job without GPUs)")
    return total


def gpus_per_node_setting(explicit: Any, env: Dict[str, str], het_group: Optional[int]) -> Tuple[int, str]:
    """GPUs per inference node and the variable that decided it: the flag, then
    ``ATROPOS_SLURM_GPUS_PER_NODE``, then Slurm's ``SLURM_GPUS_PER_NODE`` (the inference
    component's ``SLURM_GPUS_PER_NODE_HET_GROUP_<n>`` in a heterogeneous job), then 8.

    A nodelist given by hand inside a heterogeneous job (``het_group`` None) may name any
    component: their common count, or an error when they differ."""
    if explicit is not None:
        return _int_setting("--gpus-per-node", explicit, minimum=1, maximum=MAX_GPUS_PER_NODE), "--gpus-per-node"
    if ENV_GPUS_PER_NODE in env:
        return _int_setting(ENV_GPUS_PER_NODE, env[ENV_GPUS_PER_NODE], minimum=1, maximum=MAX_GPUS_PER_NODE), \
            ENV_GPUS_PER_NODE
    if het_group is None and "SLURM_HET_SIZE" in env:  # a nodelist given inside a heterogeneous job
        size = het_size(env)
        names = [f"SLURM_GPUS_PER_NODE_HET_GROUP_{n}" for n in range(size)]
        counts = [parse_gpus_per_node(name, env[name]) if env.get(name) else None for name in names]
        if len(set(counts)) > 1:  # SLURM_GPUS_PER_NODE is component 0's: which does the nodelist name?
            shown = ", ".join(f"{name}={_shown(env.get(name, '(unset)'))}" for name in names)
            raise ConfigError(f"--nodelist inside a heterogeneous job whose components have different GPUs per "
                              f"node ({shown}): give --gpus-per-node or {ENV_GPUS_PER_NODE}")
        if counts[0] is not None:  # every component the same
            return counts[0], names[0]
    slurm = "SLURM_GPUS_PER_NODE" if het_group is None else f"SLURM_GPUS_PER_NODE_HET_GROUP_{het_group}"
    if env.get(slurm):
        return parse_gpus_per_node(slurm, env[slurm]), slurm
    return DEFAULT_GPUS_PER_NODE, "default"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How servers sit on the inference nodes: one per ``tp * pp`` GPUs, on ports ``base_port + i``.

    A server needing more GPUs than a node has spans ``nodes_per_server`` consecutive nodes and
    listens on the first of them (``servers_per_node`` is then 1: per group of nodes).
    """

    tp: int
    pp: int
    gpus_per_node: int
    gpus_from: str  # the flag or variable that decided gpus_per_node, or "default"
    base_port: int
    servers_per_node: int
    nodes_per_server: int
    size: str = ""  # how TP (x PP) was given, for messages: "INFER_TP=3", "--tp=3 x --pp=2"

    @property
    def ports(self) -> List[int]:
        return [self.base_port + i for i in range(self.servers_per_node)]

    @property
    def idle_gpus(self) -> int:
        """GPUs of a node that no server uses: a TP x PP that does not divide them (the seed's rule)."""
        return self.gpus_per_node - self.servers_per_node * self.tp * self.pp if self.nodes_per_server == 1 else 0

    def warn_idle_gpus(self) -> None:
        """Log the idle GPUs; the caller does so once its other settings are checked, so that a
        mistake among them stays a one-line error."""
        if self.idle_gpus:
            log.warning("%s does not divide %d GPUs per node: %d servers per node, %d GPUs idle",
                        self.size, self.gpus_per_node, self.servers_per_node, self.idle_gpus)


def server_layout(tp: Any = None, gpus_per_node: Any = None, base_port: Any = None,
                  env: Optional[Dict[str, str]] = None, pp: Any = None, het_group: Optional[int] = None) -> Layout:
    """Validate TP, PP, GPUs per node and base port into a ``Layout``.

    Shared by discovery and the watcher so both agree on which ports a node serves.  Within a
    node, the seed's rule: ``gpus // (tp * pp)`` servers (a TP that does not divide the GPUs
    leaves some idle: ``Layout.warn_idle_gpus``).  Above a node, ``tp * pp`` must be a multiple of it.
    """
    env = os.environ if env is None else env
    gpus, gpus_from = gpus_per_node_setting(gpus_per_node, env, het_group)
    tp_name, pp_name = ("INFER_TP" if tp is None else "--tp"), ("INFER_PP" if pp is None else "--pp")
    tp = _int_setting(tp_name, env.get("INFER_TP", 1) if tp is None else tp, minimum=1)
    pp = _int_setting(pp_name, env.get("INFER_PP", 1) if pp is None else pp, minimum=1)
    need, size = tp * pp, f"{tp_name}={tp}" + (f" x {pp_name}={pp}" if pp > 1 else "")
    if need <= gpus:
        per_node, span = gpus // need, 1
    elif need % gpus:
        raise ConfigError(f"{size} needs {need} GPUs per server, more than a node's {gpus} ({gpus_from}) "
                          f"and not a multiple of it: a server spans whole nodes")
    else:
        per_node, span = 1, need // gpus
    port_name = ENV_BASE_PORT if base_port is None else "--base-port"
    port = _int_setting(port_name, env.get(ENV_BASE_PORT, DEFAULT_BASE_PORT) if base_port is None else base_port,
                        minimum=1, maximum=65536 - per_node)
    return Layout(tp, pp, gpus, gpus_from, port, per_node, span, size)


@dataclasses.dataclass(frozen=True)
class ServerAddress:
    """One inference server: ``node_index`` counts inference nodes from 0 (a server that spans
    nodes has its first node's), ``local_index`` the server's port on that node from 0."""

    host: str
    port: int
    node_index: int
    local_index: int
    scheme: str = "http"
    path: str = "/v1"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{url_host(self.host)}:{self.port}{self.path}"


def url_host(host: str) -> str:
    """A host as written in URLs and ``Host`` headers: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What discovery found: where from, the job's nodes and their split, the layout, the servers.

    ``source`` is "slurm", or the variable or flag that listed the servers (then there is no
    layout, and every host listed counts as an inference node).  ``het_group`` is the inference
    component of a heterogeneous job, else None.
    """

    servers: Tuple[ServerAddress, ...]
    source: str
    nodes: Tuple[str, ...] = ()
    training_nodes: Tuple[str, ...] = ()
    inference_nodes: Tuple[str, ...] = ()
    layout: Optional[Layout] = None
    backend: str = ""
    het_group: Optional[int] = None

    @property
    def urls(self) -> List[str]:
        return [s.url for s in self.servers]

    def to_json(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "source": self.source, "nodes": list(self.nodes), "training_nodes": list(self.training_nodes),
            "inference_nodes": list(self.inference_nodes), "het_group": self.het_group,
            "hostlist_backend": self.backend or None,
        }
        if self.layout:
            layout = dataclasses.asdict(self.layout)
            del layout["size"]  # the names of the settings, for messages
            data.update(layout, ports=self.layout.ports)
        data.update(servers=[dict(dataclasses.asdict(s), url=s.url) for s in self.servers], urls=self.urls)
        return data

    def explain(self) -> List[str]:
        """How each number was decided, one line each (``discover --explain``)."""
        if self.layout is None:
            return [f"{len(self.servers)} server(s) listed by {self.source} on {len(self.inference_nodes)} host(s); "
                    "no Slurm discovery"]
        lay, lines = self.layout, []
        if self.het_group is not None:
            lines.append(f"heterogeneous job: the servers are component {self.het_group}'s nodes "
                         f"({ENV_INFERENCE_HET_GROUP}, default the last); the other components train")
        named = {k: f" {_shown(' '.join(v))}" if v else "" for k, v in (("training", self.training_nodes),
                                                                      ("inference", self.inference_nodes))}
        lines.append(f"nodes: {len(self.training_nodes)} training{named['training']}, {len(self.inference_nodes)} "
                     f"inference{named['inference']} (hostlist backend {self.backend})")
        lines.append(f"GPUs per node: {lay.gpus_per_node}, from "
                     + ("the default (no flag or variable says)" if lay.gpus_from == "default" else lay.gpus_from))
        lines.append(f"GPUs per server: INFER_TP {lay.tp} x INFER_PP {lay.pp} = {lay.tp * lay.pp}")
        if lay.nodes_per_server > 1:
            lines.append(f"each server spans {lay.nodes_per_server} nodes and listens on the first, "
                         f"port {lay.base_port}")
        else:
            lines.append(f"{lay.servers_per_node} server(s) per inference node, ports {lay.base_port}-{lay.ports[-1]}")
        lines.append(f"{len(self.servers)} server(s) in all")
        return lines


def inference_het_group(env: Dict[str, str]) -> Optional[int]:
    """In a heterogeneous job (``SLURM_HET_SIZE`` set), the component that runs the servers:
    ``ATROPOS_SLURM_INFERENCE_HET_GROUP``, default the last; None in an ordinary job."""
    if "SLURM_HET_SIZE" not in env:
        if ENV_INFERENCE_HET_GROUP in env:
            raise ConfigError(f"{ENV_INFERENCE_HET_GROUP}={_shown(env[ENV_INFERENCE_HET_GROUP])} is set but this is "
                              "not a heterogeneous job (SLURM_HET_SIZE is not set)")
        return None
    size = het_size(env)
    if ENV_INFERENCE_HET_GROUP not in env:
        return size - 1
    return _int_setting(ENV_INFERENCE_HET_GROUP, env[ENV_INFERENCE_HET_GROUP], minimum=0, maximum=size - 1)


def het_component_nodes(env: Dict[str, str], backend: str) -> Tuple[List[List[str]], str]:
    """Each component's nodes (``SLURM_JOB_NODELIST_HET_GROUP_<n>``: in a heterogeneous job's
    batch script ``SLURM_JOB_NODELIST`` holds component 0's alone) and the backend used."""
    size = het_size(env)
    components, used = [], backend
    for group in range(size):
        name = f"SLURM_JOB_NODELIST_HET_GROUP_{group}"
        if not env.get(name):
            raise ConfigError(f"SLURM_HET_SIZE={size} but {name} is not set")
        names, used = resolve_hostnames(env[name], backend)
        components.append(names)
    return components, used


def read_server_list(value: str, name: str = ENV_SERVERS) -> List[str]:
    """The URLs of ``value``: separated by commas or whitespace, or ``@path``, a file of them
    (``~`` expanded, UTF-8 with or without a BOM), one per line, ``#`` starting a comment.  Each is
    checked as ``base_url`` is (``parse_base_url``); a server listed twice is refused (it would
    take twice the load)."""
    value = value.strip()
    if value.startswith("@"):
        path = os.path.expanduser(value[1:])
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read(MAX_SERVER_LIST_BYTES + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}={_shown(value)}: cannot read {path!r}: {getattr(e, 'strerror', None) or e}") \
                from None
        if len(text) > MAX_SERVER_LIST_BYTES:
            raise ConfigError(f"{name}={_shown(value)}: {path!r} is larger than {MAX_SERVER_LIST_BYTES} bytes")
        entries = [(f"{path} line {n}", url) for n, line in enumerate(text.splitlines(), 1)
                   for url in re.split(r"[,\s]+", line.split("#", 1)[0]) if url]
    else:
        entries = [(f"entry {n}", url) for n, url in enumerate((u for u in re.split(r"[,\s]+", value) if u), 1)]
    if not entries:
        raise ConfigError(f"{name}={_shown(value)} lists no server URL")
    if len(entries) > MAX_SERVERS:
        raise ConfigError(f"{name}={_shown(value)} lists more than {MAX_SERVERS} servers")
    seen: Dict[Tuple[str, str, int, str], str] = {}
    for where, url in entries:
        try:
            key = parse_base_url(url)
        except ConfigError as e:
            raise ConfigError(f"{name} ({where}): {e}") from None
        if key in seen:
            raise ConfigError(f"{name} ({where}): {_shown_url(url)} is listed twice (also {seen[key]})")
        seen[key] = where
    return [url for _, url in entries]


def listed_servers(value: str, name: str = ENV_SERVERS) -> Discovery:
    """A ``Discovery`` of the servers a list names, numbered per host in order of appearance."""
    hosts: Dict[str, List[int]] = {}  # host -> [its node index, servers on it so far]
    servers = []
    for url in read_server_list(value, name):
        scheme, host, port, path = parse_base_url(url)
        node = hosts.setdefault(host, [len(hosts), 0])
        servers.append(ServerAddress(host, port, node[0], node[1], scheme, path))
        node[1] += 1
    return Discovery(tuple(servers), name, nodes=tuple(hosts), inference_nodes=tuple(hosts))


def discover_servers(nodelist: Optional[str] = None, num_training_nodes: Any = None, tp: Any = None,
                     gpus_per_node: Any = None, base_port: Any = None, backend: Optional[str] = None,
                     env: Optional[Dict[str, str]] = None, pp: Any = None, servers: Optional[str] = None) -> Discovery:
    """The job's inference servers, as Atropos' documentation describes, and beyond it.

    Each argument left as None comes from the environment (see the README's table).  In order:

    * ``servers`` (or ``ATROPOS_SLURM_SERVERS`` when no ``nodelist`` is given) lists the URLs:
      no Slurm discovery at all.
    * A heterogeneous job (``SLURM_HET_SIZE``, unless ``nodelist`` is given): the inference
      component's nodes serve, the other components' train; ``NUM_TRAINING_NODES`` is then
      optional and must agree.
    * Otherwise ``SLURM_JOB_NODELIST`` (then ``SLURM_NODELIST``): the first
      ``NUM_TRAINING_NODES`` nodes train, the rest serve.

    Each inference node gets ``Layout.servers_per_node`` servers on ports ``base_port + i``;
    a server wider than a node takes ``nodes_per_server`` consecutive nodes and listens on the first.
    """
    env = os.environ if env is None else env
    if servers is None and nodelist is None and env.get(ENV_SERVERS, "").strip():
        return listed_servers(env[ENV_SERVERS])
    if servers is not None:
        return listed_servers(servers, "--servers")
    if backend is None:
        backend = env.get(ENV_HOSTLIST_BACKEND, "auto").strip() or "auto"
        if backend not in HOSTLIST_BACKENDS:
            raise ConfigError(f"{ENV_HOSTLIST_BACKEND}={backend!r} is not one of {', '.join(HOSTLIST_BACKENDS)}")
    het = None if nodelist is not None else inference_het_group(env)
    layout = server_layout(tp, gpus_per_node, base_port, env, pp, het)
    ntrain_name = "NUM_TRAINING_NODES" if num_training_nodes is None else "--num-training-nodes"
    raw = env.get("NUM_TRAINING_NODES") if num_training_nodes is None else num_training_nodes
    ntrain = None if raw is None else _int_setting(ntrain_name, raw, minimum=0)
    if het is not None:
        components, used = het_component_nodes(env, backend)
        inference = components[het]
        training = [name for group, names in enumerate(components) if group != het for name in names]
        nodes = [name for names in components for name in names]
        if ntrain is not None and ntrain != len(training):
            raise ConfigError(f"{ntrain_name}={ntrain} contradicts the heterogeneous job: the components other than "
                              f"the inference one ({het}) have {len(training)} node(s); leave it unset")
        where = f"component {het} (SLURM_JOB_NODELIST_HET_GROUP_{het})"
    else:
        if nodelist is None:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ConfigError("SLURM_JOB_NODELIST is not set (not inside a Slurm job? pass --nodelist)")
        if ntrain is None:
            raise ConfigError("NUM_TRAINING_NODES is not set (how many leading nodes train, e.g. 1)")
        nodes, used = resolve_hostnames(nodelist, backend)
        if ntrain >= len(nodes):
            raise ConfigError(f"{ntrain_name}={ntrain} leaves no inference node among the "
                              f"{len(nodes)} node(s) of {nodelist!r}")
        training, inference = nodes[:ntrain], nodes[ntrain:]
        where = f"nodelist {_shown(nodelist)}"
    span = layout.nodes_per_server
    if len(inference) % span:
        raise ConfigError(f"{len(inference)} inference node(s) of {where} cannot be split into servers of {span} "
                          f"nodes each (INFER_TP={layout.tp} x INFER_PP={layout.pp} on {layout.gpus_per_node} "
                          f"GPUs per node)")
    heads = inference[::span]
    if len(heads) * layout.servers_per_node > MAX_SERVERS:
        raise ConfigError(f"{len(heads)} inference node(s) x {layout.servers_per_node} server(s) per node is more "
                          f"than {MAX_SERVERS} servers ({where})")
    found = tuple(ServerAddress(host, layout.base_port + i, k * span, i)
                  for k, host in enumerate(heads) for i in range(layout.servers_per_node))
    layout.warn_idle_gpus()
    return Discovery(found, "slurm", tuple(nodes), tuple(training), tuple(inference), layout, used, het)


# =============================================================================================
# Config: Atropos' ServerBaseline / APIServerConfig, validated, and the per-server expansion
# =============================================================================================

SERVER_TYPES = ("openai", "trl", "sglang", "vllm")
MAX_CONFIG_INT = 2 ** 31 - 1  # caps and buffer lengths: far above any use, and a C int
_SENDABLE = re.compile(r"[!-~]+\Z")  # printable ASCII without space: URLs, paths, keys as sent
_USERINFO = re.compile(r"^([^:/?#]*://).*@")  # 'http://user:secret@' of a URL (up to its last '@')
_QUERY_OR_FRAGMENT = re.compile(r"[?#].*", re.S)  # '?api_key=...' or '#...' to the end of a URL


# The settings' checks: every variable, flag, config field and manager knob goes through these
# two, so one mistake reads the same wherever it is made (discovery uses them above).
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,18}\Z")  # ASCII digits: re's \d (and int()) take '٣' too
_NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?\Z")


def _int_setting(name: str, raw: Any, *, minimum: int, maximum: Optional[int] = None) -> int:
    """Parse an integer setting; the error names the variable and its value.

    Text must be at most 18 ASCII digits, so thousands of digits are refused here rather than
    by ``int()`` (whose own limit, 4,300 digits from 3.11 on, raises a bare ``ValueError``).
    """
    if isinstance(raw, bool):
        raise ConfigError(f"{name}={raw!r} is not an integer")
    if isinstance(raw, int):
        value = raw
    else:
        text = str(raw).strip()
        if not _INTEGER_TEXT.match(text):
            problem = "has more than 18 digits" if re.fullmatch(r"[+-]?[0-9]+", text) else "is not an integer"
            raise ConfigError(f"{name}={_shown(raw)} {problem}")
        value = int(text)
    if value < minimum:
        raise ConfigError(f"{name}={_shown(raw)} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={_shown(raw)} must be at most {maximum}")
    return value


def _float_setting(name: str, raw: Any, *, above: Optional[float] = None, minimum: Optional[float] = None,
                   maximum: Optional[float] = None) -> float:
    """Parse a finite number (a flag's text or a config field); NaN and infinity are refused.

    ``above`` is an exclusive lower bound (seconds must be ``above=0``), ``minimum`` an inclusive one.
    """
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{name}={_shown(raw)} is not a number")
    if isinstance(raw, str) and not _NUMBER_TEXT.match(raw.strip()):
        raise ConfigError(f"{name}={_shown(raw)} is not a finite number")
    try:
        value = float(raw)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(f"{name}={_shown(raw)} is not a finite number")
    if above is not None and not value > above:
        raise ConfigError(f"{name}={_shown(raw)} must be more than {above:g}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={_shown(raw)} must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={_shown(raw)} must be at most {maximum:g}")
    return value


@dataclasses.dataclass
class ServerBaseline:
    """Settings shared by every server (Atropos' field names and defaults).

    ``timeout`` bounds one whole HTTP request; ``num_max_requests_at_once`` and
    ``num_requests_for_eval`` cap the requests in flight per server for ``split="train"`` and
    ``split="eval"``.  ``connect_timeout``, ``health_path`` and ``health_timeout`` are ours.
    """

    timeout: float = 1200
    num_max_requests_at_once: int = 512
    num_requests_for_eval: int = 64
    model_name: str = "default"
    rolling_buffer_length: int = 1000
    server_type: str = "openai"
    tokenizer_name: str = "none"
    connect_timeout: float = 10.0
    health_path: str = "/health"
    health_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("timeout", "connect_timeout", "health_timeout"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(f"{name}={value!r} must be a number of seconds, not a string")
            _float_setting(name, value, above=0)
        for name in ("num_max_requests_at_once", "num_requests_for_eval", "rolling_buffer_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={_shown(value)} must be a positive integer")
            _int_setting(name, value, minimum=1, maximum=MAX_CONFIG_INT)
        if self.server_type not in SERVER_TYPES:
            raise ConfigError(f"server_type={self.server_type!r} is not one of {', '.join(SERVER_TYPES)}")
        check_request_path("health_path", self.health_path)


@dataclasses.dataclass
class APIServerConfig(ServerBaseline):
    """One server: the baseline plus its ``base_url`` (``http://host:9000/v1``) and API key.

    The key is left out of ``repr`` so that logs and tracebacks never show it.
    """

    api_key: str = dataclasses.field(default="", repr=False)
    base_url: str = ""
    n_kwarg_is_ignored: bool = False
    health_check: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_key is not None and not (isinstance(self.api_key, str) and _SENDABLE.match(self.api_key or "x")):
            raise ConfigError("api_key cannot be sent in an HTTP header: it must be a string of printable ASCII "
                              "characters without spaces (the key is not shown)")
        if self.base_url:
            parse_base_url(self.base_url)


def check_request_path(name: str, path: Any) -> str:
    """A path sent in a request line: '/' then printable ASCII, no space or control character.

    A CR/LF there would let a config value inject headers; anything else would be sent wrong.
    """
    if not isinstance(path, str) or not path.startswith("/") or not _SENDABLE.match(path):
        raise ConfigError(f"{name}={_shown(path)} must start with '/' and hold only printable ASCII characters "
                          "(no spaces or control characters)")
    return path


def check_host(name: str, host: Any) -> str:
    """A host name (letters, digits, '.', '_', '-') or an IP address, as a flag gives it."""
    if isinstance(host, str) and ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host)
            return host
        except (OSError, ValueError):
            pass
    elif isinstance(host, str) and _HOSTNAME_CHARS.match(host) and not host.startswith("-"):
        return host
    raise ConfigError(f"{name}={_shown(host)} is not a host name or IP address")


def _shown_url(url: Any) -> str:
    """A URL quoted for an error message, any ``user:password@`` part replaced by ``***@``, any
    query or fragment (``?api_key=sk-...``) by ``?***`` or ``#***``."""
    if not isinstance(url, str):
        return _shown(url)
    return _shown(_QUERY_OR_FRAGMENT.sub(lambda m: m.group(0)[0] + "***", _USERINFO.sub(r"\1***@", url)))


# The usual base URL, in the form urlsplit leaves unchanged (lowercase, explicit port, plain path,
# nothing the checks of _split_base_url refuse): read by a regex in ~1 µs instead of ~15 µs,
# twice per server (config, server) at 4,096 servers.
_PLAIN_BASE_URL = re.compile(r"(https?)://([a-z0-9._-]+):([0-9]{1,5})(/[A-Za-z0-9._~/-]*)?\Z")


def parse_base_url(url: str) -> Tuple[str, str, int, str]:
    """``http://h:9000/v1`` -> (scheme, host, port, path prefix without trailing '/').

    Refused: anything that cannot be sent as it is (non-ASCII, spaces, control characters:
    ``urlsplit`` would silently drop a CR/LF), and credentials (``http://user:secret@host``),
    which belong in ``api_key``; messages never show them.
    """
    plain = _PLAIN_BASE_URL.match(url) if isinstance(url, str) else None
    if plain and 0 < int(plain.group(3)) < 65536:
        return plain.group(1), plain.group(2), int(plain.group(3)), (plain.group(4) or "").rstrip("/")
    return _split_base_url(url)


def _split_base_url(url: str) -> Tuple[str, str, int, str]:
    """``parse_base_url`` for any URL: its checks, then ``urllib.parse.urlsplit``."""
    shown = _shown_url(url)
    if not isinstance(url, str) or not _SENDABLE.match(url):
        raise ConfigError(f"base_url={shown} must be printable ASCII without spaces or control characters")
    if "@" in url:  # anywhere: 'http://u:pa/ss@h' splits into host 'u' and a path
        raise ConfigError(f"base_url={shown} must not carry credentials (user:password@): "
                          "put the key in api_key, sent as 'Authorization: Bearer'")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"base_url={shown} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url={shown} must look like http://host:port/v1")
    if parts.query or parts.fragment:
        raise ConfigError(f"base_url={shown} must not carry a query or fragment")
    if port == 0:  # no server listens there; 'or 80' below would have made it port 80
        raise ConfigError(f"base_url={shown} has port 0: give the server's port")
    if port is None:  # 'http://h/v1' and 'http://h:/v1': the scheme's port
        port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def configs_for_urls(template: ServerBaseline, urls: Iterable[str]) -> List[APIServerConfig]:
    """One ``APIServerConfig`` per URL, each a copy of ``template`` with only ``base_url`` changed.

    ``template`` is a ``ServerBaseline`` or an ``APIServerConfig`` (whose API key is kept;
    Atropos forced it to "x").
    """
    fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template)}
    fields.pop("base_url", None)
    shared = APIServerConfig(**fields).__dict__  # every field but base_url checked once, not per URL
    configs = []
    for url in urls:
        parse_base_url(url)  # base_url's own check (ConfigError)
        config = object.__new__(APIServerConfig)  # a copy without __post_init__: ~1 µs instead of ~15
        config.__dict__.update(shared, base_url=url)
        configs.append(config)
    return configs


# The manager's knobs: keyword argument, else environment variable, else default.
ROUTINGS = ("prefix", "round_robin")  # see the Routing section
MAX_KNOB_NUMBER = 1e9  # seconds (31 years), a retry share or an epsilon: beyond, the arithmetic overflows
MANAGER_KNOBS = (  # (name, variable, default, kind: "count" an integer >= 0, "number" 0 to 1e9, "positive"
    # above 0 to 1e9, or the choices)
    ("max_retries", "ATROPOS_SLURM_MAX_RETRIES", 2, "count"),
    ("retry_backoff", "ATROPOS_SLURM_RETRY_BACKOFF", 0.5, "number"),
    ("retry_backoff_max", "ATROPOS_SLURM_RETRY_BACKOFF_MAX", 8.0, "number"),
    ("no_server_timeout", "ATROPOS_SLURM_NO_SERVER_TIMEOUT", 60.0, "number"),
    ("health_probe_interval", "ATROPOS_SLURM_HEALTH_PROBE_INTERVAL", 5.0, "positive"),  # 0: a busy loop of probes
    ("retry_budget", "ATROPOS_SLURM_RETRY_BUDGET", 0.2, "number"),
    ("routing", "ATROPOS_SLURM_ROUTING", "prefix", ROUTINGS),
    ("routing_epsilon", "ATROPOS_SLURM_ROUTING_EPSILON", 0.25, "number"),
    ("server_load_interval", "ATROPOS_SLURM_SERVER_LOAD_INTERVAL", 0.0, "number"),
)


@dataclasses.dataclass(frozen=True)
class ManagerKnobs:
    """``ServerManager``'s tuning: retries per call, backoff (s), the wait with no server healthy
    (s), the down servers' probe interval (s), the retry budget (retries as a share of the
    requests of the last 10 s, on top of 10 per second), and the routing: which policy, its load
    bound's epsilon, and how often the servers' own load is read (s; 0 = never)."""

    max_retries: int
    retry_backoff: float
    retry_backoff_max: float
    no_server_timeout: float
    health_probe_interval: float
    retry_budget: float
    routing: str
    routing_epsilon: float
    server_load_interval: float


def manager_knobs(env: Optional[Dict[str, str]] = None, **given: Any) -> ManagerKnobs:
    """Each knob from its keyword argument when not None (named so in errors), else from its
    ``ATROPOS_SLURM_*`` variable when set, else its default; integers >= 0, numbers from 0 (or
    above 0) to ``MAX_KNOB_NUMBER`` and choices, checked as the discovery variables are (one-line
    ``ConfigError`` naming the source)."""
    env = os.environ if env is None else env
    values, sources = {}, {}
    for name, variable, default, kind in MANAGER_KNOBS:
        source, raw = (name, given[name]) if given.get(name) is not None else (variable, env.get(variable))
        sources[name] = source
        if source == variable and raw is not None:
            raw = raw.strip() or None  # a blank variable is unset; a blank argument is a mistake
        if raw is None:
            values[name] = default
        elif kind == "count":
            values[name] = _int_setting(source, raw, minimum=0)
        elif kind in ("number", "positive"):
            values[name] = _float_setting(source, raw, minimum=0, maximum=MAX_KNOB_NUMBER,
                                          above=0 if kind == "positive" else None)
        elif raw in kind:
            values[name] = raw
        else:
            raise ConfigError(f"{source}={_shown(raw)} must be one of {', '.join(map(repr, kind))}")
    knobs = ManagerKnobs(**values)
    if knobs.server_load_interval and knobs.routing != "prefix":
        raise ConfigError(f"{sources['server_load_interval']}={knobs.server_load_interval:g} needs routing='prefix' "
                          f"({sources['routing']}={knobs.routing!r} reads no load)")
    return knobs


# =============================================================================================
# HTTP/1.1 protocol logic: pure functions over bytes, no I/O (after h11 and http.client)
# =============================================================================================

MAX_HEADER_BYTES = 64 * 1024  # status line + headers; also the longest chunk-size line
MAX_HEADER_COUNT = 100
MAX_SSE_LINE_BYTES = 1024 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024  # a body or a whole stream; n=64 with logprobs fits easily
MAX_RETRY_AFTER = 120.0  # openai-python's limit: asked to wait longer, we give up instead
READ_SIZE = 1 << 16  # bytes asked of the socket per read of a body
POOL_IDLE_SECONDS = 4.0  # uvicorn (vLLM, SGLang) closes idle connections after 5 s: drop ours first
# Response heads are parsed as latin-1 text (one character per byte, so nothing is lost):
# one decode per head instead of two per header line.
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-5][0-9]{2})(?: ([^\r\n]*))?\Z")  # statuses 100-599 only
_BYTES_WHITESPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips; str.strip() would also take \xa0, \x85, ...


@dataclasses.dataclass
class ResponseHead:
    """A parsed status line and header block, and how its body is framed: the one framing
    decision, made here and read by ``body_framer`` and the pool's fast path alike.

    ``content_length`` is the body's length as framed: Content-Length's, 0 for a status that
    has no body (1xx, 204, 304), None when it is chunked or read until the connection closes.
    """

    __slots__ = ("status", "reason", "headers", "keep_alive", "content_length", "chunked")  # one per response
    status: int
    reason: str
    headers: Dict[str, str]
    keep_alive: bool
    content_length: Optional[int]
    chunked: bool

    @property
    def has_body(self) -> bool:
        return not (self.status in (204, 304) or 100 <= self.status < 200)


def host_header(scheme: str, host: str, port: int) -> str:
    """The ``Host`` header's value: the port only when it is not the scheme's default."""
    default = 443 if scheme == "https" else 80
    return url_host(host) + ("" if port == default else f":{port}")


def request_head(method: str, target: str, host: str, headers: Sequence[Tuple[str, str]]) -> bytes:
    """The request line and headers, each line ending in CRLF, without the blank line.

    A caller that sends many bodies to one path makes this once and appends ``Content-Length``.
    Header values must not contain line breaks.
    """
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        if "\r" in value or "\n" in value:
            raise ConfigError(f"header {name} contains a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def build_request(method: str, target: str, host: str, headers: Sequence[Tuple[str, str]], body: bytes = b"") -> bytes:
    """Serialize one whole HTTP/1.1 request."""
    head = request_head(method, target, host, headers)
    if body or method == "POST":
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def parse_response_head(block: bytes) -> ResponseHead:
    """Parse ``status line CRLF headers`` (without the final blank line).

    This runs once per response, so the usual cases are spelled out: the ``200 OK`` status line
    without the regex, header lines looked up in a memory of valid lines (``_HEADER_LINES``).
    """
    if len(block) > MAX_HEADER_BYTES:
        raise ProtocolError(f"response head larger than {MAX_HEADER_BYTES} bytes")
    lines = block.decode("latin-1").split("\r\n")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise ProtocolError(f"more than {MAX_HEADER_COUNT} response headers")
    status_line = lines.pop(0)
    if status_line == "HTTP/1.1 200 OK":
        http11, status, reason = True, 200, "OK"
    else:
        m = _STATUS_LINE.match(status_line)
        if not m:
            raise ProtocolError(f"invalid HTTP status line {status_line[:80].encode('latin-1')!r}")
        http11, status, reason = m.group(1) == "1", int(m.group(2)), m.group(3) or ""
    headers: Dict[str, str] = {}
    length: Optional[int] = None
    for line in lines:
        key, text, line_length = _HEADER_LINES.get(line) or _parse_header_line(line)
        if key in headers:
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
        if line_length is not None:
            if length is not None and line_length != length:
                raise ProtocolError(f"conflicting Content-Length headers {sorted((length, line_length))}")
            length = line_length
    connection = headers.get("connection")
    if connection is None:  # the common case: HTTP/1.1 keeps the connection, 1.0 does not
        keep_alive = http11
    else:
        tokens = {t.strip().lower() for t in connection.split(",")}
        keep_alive = ("close" not in tokens) if http11 else ("keep-alive" in tokens)
    encoding = headers.get("transfer-encoding")
    chunked = encoding is not None and encoding.lower().rsplit(",", 1)[-1].strip() == "chunked"
    if status in (204, 304) or status < 200:
        length = 0  # no body, whatever the headers say (RFC 9112 6.3)
    elif chunked:
        length = None
    return ResponseHead(status, reason, headers, keep_alive and (chunked or length is not None), length, chunked)


_HEADER_LINES: Dict[str, Tuple[str, str, Optional[int]]] = {}  # line -> _parse_header_line(line)


def _parse_header_line(line: str) -> Tuple[str, str, Optional[int]]:
    """``Name: value`` -> (lowercase name, value, the length if it is Content-Length).

    Servers repeat most lines in every response (content-type, server, often the length and the
    date), so valid lines are remembered: up to 512, then the memory starts again.
    """
    name, sep, value = line.partition(":")
    if not sep or not name or " " in name or name != name.strip(_BYTES_WHITESPACE):
        raise ProtocolError(f"invalid header line {line[:80].encode('latin-1')!r}")
    key, text, length = name.lower(), value.strip(_BYTES_WHITESPACE), None
    if key == "content-length":
        if not (text.isdigit() and text.isascii() and len(text) <= 18):  # [0-9]{1,18}
            raise ProtocolError(f"invalid Content-Length {text[:40]!r}")
        length = int(text)
    if len(_HEADER_LINES) >= 512:
        _HEADER_LINES.clear()
    _HEADER_LINES[line] = (key, text, length)
    return key, text, length


def parse_chunk_size(line: bytes) -> int:
    """``1a;ext=1\\r\\n`` -> 26."""
    size = line.split(b";", 1)[0].strip()
    if not size or len(size) > 15 or not re.fullmatch(rb"[0-9A-Fa-f]+", size):
        raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
    return int(size, 16)


MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line (hex size and extensions) or one trailer line


class BodyFramer:
    """Where a response body ends (RFC 9112 section 6.3): a state machine over received bytes.

    ``feed(data)`` takes the bytes that follow the head as they arrive and returns the body's
    pieces among them; ``done`` turns true at the body's end.  Bytes past the end land in
    ``extra``: the server sent something nobody asked for, and a connection reused after that
    would answer the next request with it.  ``eof()`` says whether the body was complete when
    the connection closed.  ``ConnectionPool`` reads the socket; this only decides.
    """

    done = False
    extra = b""

    def __init__(self, limit: int):
        self.limit, self.received = limit, 0

    def feed(self, data: bytes) -> List[bytes]:
        raise NotImplementedError

    def eof(self) -> bool:
        return self.done

    def _count(self, size: int) -> None:
        self.received += size
        if self.received > self.limit:
            raise ResponseTooLargeError(f"response body larger than {self.limit} bytes")


class LengthBody(BodyFramer):
    """A ``Content-Length`` body (also the empty body of 204, 304 and 1xx)."""

    def __init__(self, length: int, limit: int):
        super().__init__(limit)
        self._count(length)  # refused before a byte of it is read
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> List[bytes]:
        if self.done:
            self.extra += data
            return []
        if len(data) < self.remaining:
            self.remaining -= len(data)
            return [data]
        piece, self.extra = data[:self.remaining], data[self.remaining:]
        self.remaining, self.done = 0, True
        return [piece]


class ChunkedBody(BodyFramer):
    """``Transfer-Encoding: chunked``: ``size CRLF data CRLF`` ... ``0 CRLF``, trailers, ``CRLF``.

    Data is passed on as it arrives, not a whole chunk at a time; only a partial size or
    trailer line is buffered, and those are bounded by ``MAX_CHUNK_LINE_BYTES``.
    """

    def __init__(self, limit: int):
        super().__init__(limit)
        self._buffer = b""
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer
        self._remaining = 0
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> List[bytes]:
        if self.done:
            self.extra += data
            return []
        buf, pos, pieces = (self._buffer + data if self._buffer else data), 0, []
        while not self.done:
            if self._state == "data":
                take = min(self._remaining, len(buf) - pos)
                if not take:
                    break
                pieces.append(buf[pos:pos + take])
                pos, self._remaining = pos + take, self._remaining - take
                if not self._remaining:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not terminated by CRLF")
                pos, self._state = pos + 2, "size"
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_CHUNK_LINE_BYTES:
                        raise ProtocolError(f"chunk size or trailer line longer than {MAX_CHUNK_LINE_BYTES} bytes")
                    break
                line, pos = buf[pos:end], end + 2
                if self._state == "size":
                    size = parse_chunk_size(line)
                    self._count(size)
                    self._state, self._remaining = ("data", size) if size else ("trailer", 0)
                elif not line:
                    self.done = True
                else:
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > MAX_HEADER_BYTES:
                        raise ProtocolError(f"trailers larger than {MAX_HEADER_BYTES} bytes")
        if self.done:
            self.extra, self._buffer = buf[pos:], b""
        else:
            self._buffer = buf[pos:]
        return pieces


class UntilCloseBody(BodyFramer):
    """A body without length or chunking: it ends when the server closes the connection."""

    def feed(self, data: bytes) -> List[bytes]:
        self._count(len(data))
        return [data]

    def eof(self) -> bool:
        self.done = True
        return True


def body_framer(head: "ResponseHead", limit: int) -> BodyFramer:
    """The framing that ``head`` announces; a body over ``limit`` bytes raises ``ResponseTooLargeError``."""
    if head.content_length is not None:  # 0 for a status without a body
        return LengthBody(head.content_length, limit)
    if head.chunked:
        return ChunkedBody(limit)
    return UntilCloseBody(limit)


def parse_retry_after(headers: Dict[str, str]) -> Optional[float]:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    raw = headers.get("retry-after-ms")
    if raw is not None:
        try:
            return max(0.0, float(raw) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime  # lazily: see _LazyModule
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def error_message(body: bytes, limit: int = 500) -> str:
    """The server's own words from an error body: OpenAI, vLLM, FastAPI and plain-text shapes."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text[:limit] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if isinstance(msg, str) and msg:
                return msg[:limit]
        elif isinstance(err, str):
            return err[:limit]
        if isinstance(data.get("detail"), str):
            return data["detail"][:limit]
    return text[:limit]


class SSEParser:
    """Server-sent events: feed bytes, get the ``data`` of each complete event.

    Lines end in LF or CRLF; ``data:`` lines of one event are joined with newlines; comments
    (``:keep-alive``) and other fields are ignored.  A line over ``MAX_SSE_LINE_BYTES`` is an
    error rather than unbounded buffering.  Each byte is scanned once and an unfinished line is
    copied once, when it ends: a long line arriving in small pieces costs what it costs whole.
    """

    def __init__(self) -> None:
        self._partial: List[bytes] = []  # the pieces of a line not ended yet
        self._partial_size = 0
        self._data: List[str] = []

    def feed(self, chunk: bytes) -> List[str]:
        if b"\n" not in chunk:
            if chunk:
                self._hold(chunk)
            return []
        lines = chunk.split(b"\n")
        if self._partial:
            lines[0] = b"".join(self._partial) + lines[0]
            self._partial, self._partial_size = [], 0
        tail = lines.pop()
        if tail:
            self._hold(tail)
        events = []
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace"))
        return events

    def _hold(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_size += len(piece)
        if self._partial_size > MAX_SSE_LINE_BYTES:
            raise ProtocolError(f"server-sent event line longer than {MAX_SSE_LINE_BYTES} bytes")

    def close(self) -> List[str]:
        """End of stream: an event without its final blank line still counts."""
        return self.feed(b"\n\n") if self._partial or self._data else []


# =============================================================================================
# HTTP I/O: asyncio streams, a keep-alive pool per server, and a bounded one-shot GET
# =============================================================================================


class _Expired(Exception):
    """Thrown into a task whose ``_Deadline`` passed (Python < 3.11); never leaves ``_Deadline``."""


_UNCANCEL = sys.version_info >= (3, 11)  # Task.uncancel: a task counts the cancellations it was sent


class _Deadline:
    """Interrupt the running task after ``seconds`` and raise ``ServerTimeoutError`` instead.

    ``asyncio.timeout()`` exists only from Python 3.11, and ``asyncio.wait_for()`` costs a
    task per call; this costs one timer handle, or less with ``timers``, a ``_DeadlineQueue``
    of deadlines of this length.

    A cancellation from outside must never be swallowed, even one that lands in the same loop
    iteration as the deadline.  From 3.11 the task counts cancellations (``uncancel``).  Before,
    a second ``cancel()`` would merge into ours without a trace, so there the deadline does not
    cancel: it fails the future the task waits on with ``_Expired``.  An outside cancellation
    that comes later still turns that into ``CancelledError``, and one that came first has
    cancelled the future already, so the deadline stands down.
    """

    __slots__ = ("_seconds", "_message", "_url", "_timers", "_task", "_handle", "expired", "_cancelled",
                 "when", "queued")

    def __init__(self, seconds: float, message: str, url: str = "", timers: Optional["_DeadlineQueue"] = None):
        self._seconds, self._message, self._url, self._timers = seconds, message, url, timers
        self.expired = self._cancelled = False

    def __enter__(self) -> "_Deadline":
        timers = self._timers
        if timers is not None:
            # The queue's loop is the running one (post checks): current_task(loop) spares the
            # getpid() system call that finding the running loop costs before Python 3.12.
            self._task = asyncio.current_task(timers.loop)
            self._handle = None
            timers.add(self)
        else:
            self._task = asyncio.current_task()
            self._handle = asyncio.get_running_loop().call_later(max(0.0, self._seconds), self.expire)
        return self

    def expire(self) -> None:
        """The deadline passed: interrupt the task (called by the timer)."""
        if _UNCANCEL:
            self.expired = self._cancelled = True
            self._task.cancel()
            return
        waiter = self._task._fut_waiter  # what the task awaits now (readable on 3.9 and 3.10)
        if waiter is not None and waiter.done():
            return  # cancelled from outside already, or its result is in: nothing to interrupt
        self.expired = True
        if waiter is None or isinstance(waiter, asyncio.Task):
            self._cancelled = True  # not waiting on a plain future (rare): cancel after all
            self._task.cancel()
        else:
            waiter.set_exception(_Expired())

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is None:
            self._timers.remove(self)
        else:
            self._handle.cancel()
        if not self.expired:
            return False
        if exc_type is _Expired:
            raise ServerTimeoutError(self._message, self._url) from None
        if exc_type is asyncio.CancelledError and self._cancelled:
            if _UNCANCEL and self._task.uncancel() > 0:
                return False  # cancelled by others too: theirs goes on
            raise ServerTimeoutError(self._message, self._url) from None
        return False


class _DeadlineQueue:
    """One timer handle for many deadlines of one length on one event loop (``_Deadline(timers=)``).

    Deadlines of equal length expire in the order they were set, so they wait in a FIFO and one
    asyncio timer, armed for the oldest pending one, serves them all: per request an append and
    a flag instead of a push into (and a cancel in) asyncio's timer heap: about a tenth of
    the client's CPU per request (bench/).  Ended entries leave from the front as they end, and are swept
    out when a long request at the front holds back more than half of the queue.

    An entry is anything with ``when``, ``queued`` and ``expire()``: a ``_Deadline``.
    """

    __slots__ = ("loop", "seconds", "_entries", "_live", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float):
        self.loop, self.seconds = loop, seconds
        self._entries: deque = deque()
        self._live = 0
        self._timer: Optional[asyncio.TimerHandle] = None

    def add(self, entry: _Deadline) -> None:
        """Arm ``entry``: its ``expire()`` runs ``seconds`` from now, unless it is removed first."""
        entry.when = when = self.loop.time() + self.seconds
        entry.queued = True
        self._entries.append(entry)
        self._live += 1
        if self._timer is None:
            self._timer = self.loop.call_at(when, self._fire)

    def remove(self, entry: _Deadline) -> None:
        """Disarm ``entry`` (again: nothing)."""
        if not entry.queued:
            return
        entry.queued = False
        self._live -= 1
        entries = self._entries
        while entries and not entries[0].queued:
            entries.popleft()
        if len(entries) > 64 and self._live * 2 < len(entries):
            self._entries = deque(e for e in entries if e.queued)

    def _fire(self) -> None:
        self._timer = None
        entries, now = self._entries, self.loop.time()
        while entries:
            entry = entries[0]
            if entry.queued and entry.when > now:
                self._timer = self.loop.call_at(entry.when, self._fire)
                return
            entries.popleft()
            if entry.queued:
                entry.queued = False
                self._live -= 1
                entry.expire()


# Requests written in one event loop iteration, per loop, until they are sent together (_send_soon).
_OUTBOXES: Dict[asyncio.AbstractEventLoop, List[Tuple[asyncio.WriteTransport, bytes]]] = {}
_SEND_BURST = 16  # requests sent at once without waiting for the iteration's end


def _send_soon(loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport, data: bytes) -> None:
    """Write ``data`` with the other requests of this loop iteration: at its end, or at once
    when ``_SEND_BURST`` are waiting.

    On loopback (a trainer and its inference servers on one node; every benchmark here) a send
    that finds the server process asleep pays for waking it, in the sender's CPU.  Requests
    written one by one as their tasks run, tens of µs apart, find it asleep each time; sent back
    to back, a burst wakes each server once: a fifth to a quarter less client CPU per request
    (bench/).  The cap bounds the delay: a request waits for at most 15 others' tasks (without
    it, 3% less throughput at 512 in flight and 50 ms).  Nothing waits for the socket: what it
    cannot take at once stays in the transport's buffer, sent as it drains, while the caller
    waits for the answer.
    """
    box = _OUTBOXES.get(loop)
    if box is None:
        for closed in [other for other in list(_OUTBOXES) if other.is_closed()]:  # list(): other threads' loops
            _OUTBOXES.pop(closed, None)  # closed before its last iteration ran: nothing to send there
        box = _OUTBOXES[loop] = []
        loop.call_soon(_send_all, loop)
    box.append((transport, data))
    if len(box) >= _SEND_BURST:
        _send_box(box)


def _send_all(loop: asyncio.AbstractEventLoop) -> None:
    _send_box(_OUTBOXES.pop(loop, []))


def _send_box(box: List[Tuple[asyncio.WriteTransport, bytes]]) -> None:
    for transport, data in box:
        if transport.is_closing():  # its call ended (cancelled, timed out) before it left
            continue
        try:
            transport.write(data)
        except Exception:  # one connection's fault must not strand the rest of the burst:
            transport.abort()  # its caller reads the end of the connection instead of an answer
    box.clear()


def _unread_bytes(reader: asyncio.StreamReader) -> bytearray:
    """The bytes ``reader`` holds unread, as a live view that follows its reads and feeds.

    ``StreamReader`` has no public way to say what it buffered, so this is the one read of its
    private state: ``_buffer``, a ``bytearray`` made once in ``__init__`` and from then on only
    extended and cut in place (CPython 3.4 to 3.13), so one reference per connection stays true.
    """
    return reader._buffer


class _Connection:
    """One keep-alive connection: its streams, and since when it idles in the pool."""

    __slots__ = ("reader", "writer", "transport", "unread", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.transport = reader, writer, writer.transport
        self.unread = _unread_bytes(reader)
        self.idle_since = 0.0

    def usable(self) -> bool:
        """Open, and holding no unread byte: bytes a server sent unasked (after a body, or while
        the connection idled) would be taken for the answer to the next request.  A reader's
        error needs no look of its own: asyncio marks the transport closing before it tells the
        reader (``_force_close``, then ``connection_lost``)."""
        return not (self.unread or self.transport.is_closing() or self.reader.at_eof())

    def keep_what_arrived(self) -> bool:
        """After the connection broke: make the bytes received before it readable, then EOF.

        A server may answer early and close without reading the whole request (413 on a large
        body); the reset that follows would hide that answer behind the reader's exception.
        Returns False when nothing had arrived.
        """
        data = bytes(self.unread)
        if not data:
            return False
        if self.reader.exception() is not None:
            self.reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
            self.reader.feed_data(data)
            self.reader.feed_eof()
            self.unread = _unread_bytes(self.reader)
        return True

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # its event loop is closed (an earlier asyncio.run): the GC closes the socket
            pass


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one server.

    The pool never opens more connections than requests in flight, and the manager caps those
    per server, so the server's concurrency cap also caps its connections.  uvicorn (vLLM,
    SGLang) closes idle connections after 5 s: a reused connection that turns out closed before
    any response byte arrives raises ``StaleConnectionError``, and the manager resends it at once
    to the same server on a fresh connection.  The pool does not resend by itself: the server
    may have read the request before dropping it, and ``max_retries`` bounds every HTTP request
    a call makes.
    Idle connections of an earlier event loop (one ``asyncio.run`` per step) are discarded; that
    loop is closed by then, so their sockets are closed by the garbage collector, not here (a
    ``ResourceWarning`` under ``-X dev``).
    """

    def __init__(self, scheme: str, host: str, port: int, *, connect_timeout: float,
                 max_body_bytes: int = MAX_BODY_BYTES, url: str = ""):
        self.host, self.port, self.url = host, port, url
        self.connect_timeout = connect_timeout
        self.max_body_bytes = max_body_bytes
        if scheme == "https":
            import ssl  # lazily: see _LazyModule
            self._ssl = ssl.create_default_context()
        else:
            self._ssl = None
        self._idle: List[_Connection] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # the loop the connections belong to
        self.opened = 0  # connections opened so far, for stats and tests
        self.closed = False

    async def _connect(self) -> _Connection:
        try:
            with _Deadline(self.connect_timeout, f"connect timed out after {self.connect_timeout:g} s", self.url):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, limit=MAX_HEADER_BYTES)
        except OSError as e:
            raise _io_error(e, self.url, "connect") from None
        self.opened += 1
        self._loop = asyncio.get_running_loop()
        return _Connection(reader, writer)

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> Optional[_Connection]:
        if self._idle and self._loop is not loop:
            self.drop_idle()  # opened in an earlier event loop: unusable in this one
        while self._idle:
            conn = self._idle.pop()  # the newest: if it idled too long, so did all the others
            if time.monotonic() - conn.idle_since > POOL_IDLE_SECONDS:
                conn.close()
                self.drop_idle()
                return None
            if conn.usable():
                return conn
            conn.close()
        return None

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self.closed and conn.usable():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def send(self, request: bytes, fresh: bool = False, loop: Optional[asyncio.AbstractEventLoop] = None,
                   stream: bool = False) -> Tuple[ResponseHead, bytes, Optional[_Connection]]:
        """Write ``request`` once and read the answer: ``(head, body, None)``, the connection back
        in the pool.  With ``stream``, a 2xx body is left unread: ``(head, b"", connection)``, for
        ``iter_body``, which gives the connection back.

        ``fresh`` skips the idle connections: a resend after a stale one must not meet another.
        ``loop``, the running loop if the caller has it at hand: finding it costs a getpid()
        system call per call before Python 3.12.  The request leaves with the others of this
        loop iteration (``_send_soon``).  The write, the head and a body already received whole
        are one coroutine: every level of ``await`` costs CPU on each request.
        """
        loop = loop or asyncio.get_running_loop()
        conn = None if fresh else self._take_idle(loop)
        stale = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            _send_soon(loop, conn.transport, request)
            while True:
                try:
                    block = await conn.reader.readuntil(b"\r\n\r\n")
                except (ConnectionError, OSError):
                    if not conn.keep_what_arrived():
                        raise
                    continue
                head = parse_response_head(block[:-4])
                if not 100 <= head.status < 200:
                    break
        except BaseException as e:
            conn.close()
            if isinstance(e, OSError) or (isinstance(e, asyncio.IncompleteReadError) and not e.partial):
                raise self._nothing_received("EOF" if isinstance(e, EOFError) else type(e).__name__, stale) from None
            error = _io_error(e, self.url, "head")
            if error is None:
                raise
            raise error from None
        if stream and head.status < 300:
            return head, b"", conn
        length = head.content_length
        if length is not None and len(conn.unread) == length <= self.max_body_bytes:
            # The common case, a body of known length (the head's framing: see ResponseHead)
            # already received whole, and nothing after it: read at once, without a framer.
            data = await conn.reader.read(length)
            self.release(conn, head.keep_alive)
            return head, data, None
        return head, await self._read_body(conn, head), None

    def _nothing_received(self, reason: str, stale: bool) -> ServerConnectionError:
        """The error for a connection that ended before any response byte; a pooled (stale) one
        is resent by the manager, and its idle siblings were likely closed too (idle timeout, or
        the server died)."""
        if not stale:
            return ServerConnectionError(f"connection closed before any response byte ({reason})", self.url)
        self.drop_idle()
        return StaleConnectionError(f"pooled connection closed before any response byte ({reason})", self.url)

    async def _read_body(self, conn: _Connection, head: ResponseHead) -> bytes:
        """The whole body of ``head``'s response, framed; the connection goes back to the pool after."""
        pieces: List[bytes] = []
        reusable = False
        try:
            with _ReadingBody(self.url):
                framer = body_framer(head, self.max_body_bytes)
                while not framer.done:
                    pieces += await self._read_pieces(conn, framer)
            reusable = head.keep_alive and not framer.extra
        finally:
            self.release(conn, reusable)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def iter_body(self, conn: _Connection, head: ResponseHead) -> AsyncIterator[bytes]:
        """Yield the body in pieces as they arrive.

        The connection is released to the pool when the body ends cleanly and closed otherwise,
        including when the consumer stops early.
        """
        reusable = False
        try:
            with _ReadingBody(self.url):
                framer = body_framer(head, self.max_body_bytes)
                while not framer.done:
                    for piece in await self._read_pieces(conn, framer):
                        yield piece
            reusable = head.keep_alive and not framer.extra
        finally:
            self.release(conn, reusable)

    @staticmethod
    async def _read_pieces(conn: _Connection, framer: BodyFramer) -> List[bytes]:
        """One read from the socket, framed; a close before the body's end is an error."""
        data = await conn.reader.read(READ_SIZE)
        if data:
            return framer.feed(data)
        if not framer.eof():
            raise asyncio.IncompleteReadError(b"", None)
        return []

    def drop_idle(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def close(self) -> None:
        """Close the idle connections, and from now on every connection a call gives back."""
        self.closed = True
        self.drop_idle()


class _ReadingBody:
    """While a body is read: what can go wrong becomes this module's errors, naming the server."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> "_ReadingBody":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        error = None if exc is None else _io_error(exc, self.url, "body")
        if error is None:
            return False
        raise error from None


def _io_error(error: BaseException, url: str, part: str) -> Optional[ServerError]:
    """The one translation of what sockets and asyncio's streams raise into this module's
    errors, naming the server: met in ``part`` of an exchange ("connect", the response's
    "head" or "body"); None for anything else (and a ``ProtocolError`` already named), which
    propagates as it is.  (A pooled connection that ends before any response byte is the
    pool's own case: ``ConnectionPool._nothing_received``.)"""
    if isinstance(error, ProtocolError):  # ours, from a parser that does not know the URL
        return None if error.url else type(error)(str(error), url)  # ResponseTooLargeError stays: not retried
    if isinstance(error, asyncio.LimitOverrunError):
        return ProtocolError(f"response {part} larger than {MAX_HEADER_BYTES} bytes", url)
    if isinstance(error, asyncio.IncompleteReadError):
        if part == "head":
            return ServerConnectionError(f"connection closed in the response head after {len(error.partial)} bytes", url)
        return ServerConnectionError("connection closed in the middle of the response body", url)
    if isinstance(error, OSError):  # ConnectionError included
        if part == "connect":
            return ServerConnectionError(f"cannot connect: {error.strerror or error}", url)
        return ServerConnectionError(f"connection lost in the response {part}: {error}", url)
    return None


async def http_get(base_url: str, path: str, timeout: float) -> Tuple[int, bytes]:
    """GET ``path`` at the root of ``base_url``'s server on a fresh connection: (status, body).

    Bounded by ``timeout`` as a whole (connect, head and body), so a server that accepts and
    never answers, or trickles its bytes, cannot hold the caller longer.  Health probes and
    the trainer API use it; like every request here it ignores ``http_proxy``.  Bodies are
    small (a health check, the trainer's status): at most 1 MiB.
    """
    scheme, host, port, _ = parse_base_url(base_url)
    pool = ConnectionPool(scheme, host, port, connect_timeout=timeout, max_body_bytes=1 << 20, url=base_url)
    request = build_request("GET", path, host_header(scheme, host, port), [("Connection", "close")])
    try:
        with _Deadline(timeout, f"GET {path}: no whole answer within {timeout:g} s", base_url):
            head, body, _ = await pool.send(request)
    finally:
        pool.close()
    return head.status, body


# =============================================================================================
# Server: one OpenAI-compatible endpoint, its responses and streams
# =============================================================================================


# The optional fields of the openai SDK's response types (ChatCompletion, Completion, their
# choices, messages, deltas, logprobs and usage): absent from a server's JSON, they read as None,
# as the SDK's objects give them (``message.tool_calls`` is None when the model called no tool).
OPENAI_OPTIONAL_FIELDS = frozenset((
    "service_tier", "system_fingerprint", "usage", "logprobs", "content", "refusal", "annotations", "audio",
    "function_call", "tool_calls", "role", "finish_reason", "completion_tokens_details",
    "prompt_tokens_details", "text_offset", "token_logprobs", "tokens", "top_logprobs", "bytes",
))


class AttrDict(dict):
    """A JSON object readable both ways: ``resp.choices[0].message.content`` and ``resp["usage"]``.

    A missing key is an ``AttributeError``, except the openai SDK's optional fields, which read
    as None (``OPENAI_OPTIONAL_FIELDS``).
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            if name in OPENAI_OPTIONAL_FIELDS:
                return None
            raise AttributeError(name) from None

    def model_dump(self, exclude_none: bool = False) -> Dict[str, Any]:
        """Plain dicts and lists, as the SDK's pydantic ``model_dump()``: the fields the server sent."""
        data = json.loads(json.dumps(self))
        return _without_none(data) if exclude_none else data


def _without_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_without_none(v) for v in data]
    return data


# The fields most read as attributes (``resp.choices[0].message.content``), with the optional ones.
_OPENAI_READ_FIELDS = OPENAI_OPTIONAL_FIELDS | {
    "id", "object", "created", "model", "choices", "index", "message", "text", "delta", "stop_reason",
    "prompt_tokens", "completion_tokens", "total_tokens", "reasoning_content"}


class _Field:
    """``AttrDict.<name>`` as a class attribute, read the way ``AttrDict.__getattr__`` reads it.

    Before Python 3.12 an attribute that the normal lookup misses builds and formats an
    ``AttributeError`` before ``__getattr__`` runs: about 0.6 µs per access, 2 µs for
    ``resp.choices[0].message.content``.  There, the fields users read get this descriptor.
    """

    __slots__ = ("name", "optional")

    def __init__(self, name: str):
        self.name, self.optional = name, name in OPENAI_OPTIONAL_FIELDS

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj[self.name]
        except KeyError:
            if self.optional:
                return None
            raise AttributeError(self.name) from None


if sys.version_info < (3, 12):
    for _name in _OPENAI_READ_FIELDS:
        setattr(AttrDict, _name, _Field(_name))
    del _name


class APIResponse(AttrDict):
    """A decoded response body; ``raw`` keeps the bytes as the server sent them."""

    __slots__ = ("raw",)


def _compact_json_encoder() -> Callable[[Any], str]:
    """``json.dumps(obj, separators=(",", ":"))``, with json's C encoder made once.

    ``JSONEncoder.encode`` makes a C encoder per call, behind two Python frames: about 1.3 µs
    of each request.  The C encoder keeps the ids of the containers it is inside in
    ``markers``, to refuse circular data; an error leaves them there, so they are cleared.
    """
    encoder = json.JSONEncoder(separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator
        return encoder.encode
    markers: Dict[int, Any] = {}
    chunks = make(markers, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)

    def encode(obj: Any) -> str:
        try:
            return "".join(chunks(obj, 0))
        except BaseException:
            markers.clear()
            raise

    return encode


_json_compact = _compact_json_encoder()
_ATTR_DECODER = json.JSONDecoder(object_hook=AttrDict)  # as json.loads(..., object_hook=) does per call


def _loads_attr(data: Any) -> Any:
    """``json.loads(data, object_hook=AttrDict)`` with a decoder made once (the same input rules)."""
    if not isinstance(data, str):  # a JSON object's second byte is never NUL in UTF-8: json.loads' own test
        utf8 = data[:1] == b"{" and data[1:2] not in (b"\x00", b"")
        data = data.decode("utf-8" if utf8 else json.detect_encoding(data), "surrogatepass")
    elif data.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    if data[:1] == "{" and data[-1:] == "}":  # no whitespace around: decode()'s scan, without its wrapping
        try:
            obj, end = _ATTR_DECODER.scan_once(data, 0)
        except StopIteration:
            end = -1
        if end == len(data):
            return obj
    return _ATTR_DECODER.decode(data)


def decode_object(data: Any, url: str, what: str, aborts: bool = False) -> AttrDict:
    """One JSON object from the server (a body, a stream event), shaped as OpenAI's, or ``ProtocolError``.

    Nesting is bounded by what json's decoder can hold (Python's recursion limit, about 1,000
    levels); a ``choices`` that is not a list of objects is refused here, so that nothing
    downstream meets a ``TypeError``.  With ``aborts``, an aborted choice raises
    ``GenerationAbortedError`` (``check_not_aborted``, in the same loop).
    """
    try:
        value = _loads_attr(data)
    except ValueError:
        raise ProtocolError(f"{what} is not JSON: {data[:80]!r}", url) from None
    except RecursionError:
        raise ProtocolError(f"{what} is JSON nested deeper than Python's recursion limit "
                            f"({sys.getrecursionlimit()})", url) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object: {data[:80]!r}", url)
    choices = value.get("choices")
    if choices is not None:
        for choice in choices if isinstance(choices, list) else (None,):  # a loop: all(genexpr) costs more
            if not isinstance(choice, dict):
                raise ProtocolError(f"{what} has 'choices' that are not a list of objects: {data[:80]!r}", url)
            if aborts and choice.get("finish_reason") == "abort":
                raise _aborted(choice, url)
    return value


def decode_response(body: bytes, url: str = "", aborts: bool = False) -> Any:
    """An ``APIResponse``; ``aborts``: see ``decode_object``."""
    response = APIResponse(decode_object(body, url, "response body", aborts))
    response.raw = body
    return response


class _NonFiniteLiteral(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` in a body: Python's JSON reader takes them, JSON has none."""


def _refuse_literal(name: str) -> Any:
    raise _NonFiniteLiteral(name)


_TOKEN_DECODER = json.JSONDecoder(parse_constant=_refuse_literal)


def decode_token_answer(body: bytes, url: str = "") -> Any:
    """A token protocol's answer (``TokenReader`` reads it): any JSON value, as plain data;
    ``NaN``/``Infinity`` literals raise ``TokenProtocolError``, a body that is not JSON
    ``ProtocolError`` (as for any answer)."""
    try:
        return _TOKEN_DECODER.decode(body.decode("utf-8"))
    except _NonFiniteLiteral as e:
        raise TokenProtocolError(f"the answer holds {e}, which is not JSON (a logprob must be a finite number)",
                                 url) from None
    except (ValueError, RecursionError):
        raise ProtocolError(f"response body is not JSON: {body[:80]!r}", url) from None


def check_not_aborted(response: Any, url: str) -> Any:
    """Raise ``GenerationAbortedError`` if any choice of a response (or chunk) was aborted."""
    for choice in response.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason") == "abort":
            raise _aborted(choice, url)
    return response


def _aborted(choice: Dict[str, Any], url: str) -> GenerationAbortedError:
    return GenerationAbortedError(f"the server aborted choice {choice.get('index')} (finish_reason 'abort')", url)


class EventStream:
    """The events of a ``stream=True`` response, as ``AttrDict`` chunks, ending at ``[DONE]``.

    Use ``async for chunk in stream`` (or ``async with stream``).  It holds its server slot and
    connection until the last event, an error, ``aclose()``, or until it is dropped; the whole
    stream is bounded by the config's ``timeout``.  An error event raises ``StreamError``.
    """

    def __init__(self, body: AsyncIterator[bytes], conn: _Connection, deadline: float, url: str, on_close=None):
        self._body, self._conn, self._deadline, self.url = body, conn, deadline, url
        self._parser, self._pending = SSEParser(), deque()
        self._on_close, self._closed, self._started = on_close, False, False
        self._loop = asyncio.get_running_loop()

    def __del__(self) -> None:
        """Dropped without ``aclose()`` (never read, left after ``break``, lost in a cancelled
        ``gather``): give back the slot and close the connection, as openai's streams do."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        if self._on_close is not None:
            try:
                self._loop.call_soon_threadsafe(self._on_close)
            except RuntimeError:  # the loop is closed: nobody waits for the slot any more
                pass

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> AttrDict:
        try:
            while not self._pending:
                if self._closed:
                    raise StopAsyncIteration
                timeout = self._deadline - time.monotonic()
                with _Deadline(timeout, "stream timed out", self.url):
                    try:
                        self._started = True
                        chunk = await self._body.__anext__()
                    except StopAsyncIteration:
                        self._pending.extend(self._parser.close())
                        await self.aclose()
                        break
                self._pending.extend(self._parser.feed(chunk))
            if not self._pending:
                raise StopAsyncIteration
            data = self._pending.popleft()
            if data.strip() == "[DONE]":
                await self._finish()
                raise StopAsyncIteration
            chunk = decode_object(data, self.url, "stream event")
            if "error" in chunk:
                raise StreamError(f"error event in the stream: {error_message(data.encode())}", self.url)
            check_not_aborted(chunk, self.url)
            return chunk
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    async def _finish(self) -> None:
        """After ``[DONE]``: take the body's end if it is already here (the connection is then
        reused), else close the connection at once rather than wait for it."""
        self._pending.clear()
        try:
            with _Deadline(0, "the body's end had not arrived with [DONE]", self.url):
                async for _ in self._body:
                    pass
        except ServerError:  # not here yet, or broken: the body closed its connection
            pass
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._body.aclose()
            if not self._started:  # an unstarted generator runs no finally: close by hand
                self._conn.close()
        finally:
            if self._on_close is not None:
                self._on_close()

    async def __aenter__(self) -> "EventStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# Call arguments that are options of the call, not part of the JSON body (see request_body).
_NOT_SENT = frozenset(("split", "timeout", "skip_reasoning", "extra_body"))


def extra_body_of(kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The caller's ``extra_body`` (merged into a body last, as the openai SDK does), checked.
    The SDK's other per-call options, ``extra_headers`` and ``extra_query``, are refused: passed
    through they would reach the server as body keys (a 400, or a 500 that marks it down)."""
    if "extra_headers" in kwargs or "extra_query" in kwargs:
        raise ConfigError("extra_headers= and extra_query= are not supported (extra_body= is)")
    extra = kwargs.get("extra_body")
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra_body={_shown(extra)} must be a dict")
    return extra


class OpenAIServer:
    """The HTTP client of one OpenAI-compatible server: its calls, its health check, its statistics.

    Calls here make exactly one HTTP request and raise on any failure; the dispatch state
    (health, slots in flight, caps) is ``Slots``', retries are ``RetryPolicy``'s.
    """

    def __init__(self, config: APIServerConfig, max_body_bytes: int = MAX_BODY_BYTES, reasoning_config: Any = None):
        if not config.base_url:
            raise ConfigError("APIServerConfig.base_url is empty")
        scheme, host, port, prefix = parse_base_url(config.base_url)
        self.config = config
        self.url = config.base_url
        self.reasoning = reasoning_extra_body(reasoning_config, config.base_url)  # merged into chat bodies
        self._prefix = prefix
        self._host_header = host_header(scheme, host, port)
        self._pool = ConnectionPool(scheme, host, port, connect_timeout=config.connect_timeout,
                                    max_body_bytes=max_body_bytes, url=self.url)
        # Made on the first health check: most servers are never probed, and every object made
        # here is made 4,096 times at 4,096 servers (and traversed by each garbage collection).
        self._prober: Optional[HealthProber] = None
        self._headers: Tuple[Tuple[str, str], ...] = (("Content-Type", "application/json"),
                                                      ("Accept", "application/json"))
        if config.api_key:
            self._headers += (("Authorization", f"Bearer {config.api_key}"),)
        self._post_heads: Dict[str, bytes] = {}  # target -> request_head(), made once per target
        self._timers: Optional[_DeadlineQueue] = None  # the request timeouts' one timer (see post)
        self._timeout_message = ""  # made with _timers
        self.stats = RequestStats(config.rolling_buffer_length)  # recorded by the manager, read by stats() and W&B
        self.slot: Optional["ServerSlot"] = None  # its record in a manager's Slots (set by the manager), read-only here

    def __repr__(self) -> str:
        return f"<OpenAIServer {self.url} done={self.stats.done}>"

    @property
    def server_healthy(self) -> bool:
        """Atropos' name: whether the manager holding this server counts it healthy."""
        return self.slot is None or self.slot.healthy

    def request_body(self, path: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The JSON body that Atropos' servers send through the openai SDK for these arguments.

        ``model`` is the config's; ``split``, ``timeout`` (the call's own limit, see ``post``)
        and ``skip_reasoning`` are not sent; chat bodies get Atropos' reasoning settings unless
        ``skip_reasoning``; ``extra_body`` is merged in last, its keys winning, as in the SDK.
        Other keys pass through (vLLM's ``ignore_eos``, ...).
        """
        if _NOT_SENT.isdisjoint(kwargs):  # the usual call: a plain copy
            body = dict(kwargs)
        else:
            body = {k: v for k, v in kwargs.items() if k not in _NOT_SENT}
        body["model"] = self.config.model_name
        extra = extra_body_of(kwargs)
        if self.reasoning is not None and path == "/chat/completions" and not kwargs.get("skip_reasoning"):
            extra = {**(extra or {}), **self.reasoning}
            if "api.openai.com" in self.url:  # OpenAI's reasoning models, as Atropos calls them
                body["temperature"] = 1.0
                if body.get("max_tokens"):
                    body["max_completion_tokens"] = body.pop("max_tokens")
        if extra:
            body.update(extra)
        return body

    async def chat_completion(self, **kwargs: Any) -> Any:
        return await self.post("/chat/completions", self.request_body("/chat/completions", kwargs),
                               timeout=kwargs.get("timeout"))

    async def completion(self, **kwargs: Any) -> Any:
        return await self.post("/completions", self.request_body("/completions", kwargs), timeout=kwargs.get("timeout"))

    async def post(self, path: str, body: Dict[str, Any], on_stream_close=None, fresh: bool = False,
                   timeout: Optional[float] = None, root: bool = False, tokens: bool = False,
                   loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
        """POST JSON to ``base_url + path`` (to the server's root with ``root=True``: SGLang's
        and Atropos' ``/generate``); an ``APIResponse``, or an ``EventStream`` if streaming;
        with ``tokens``, a token protocol's answer as plain JSON (``decode_token_answer``).

        ``timeout`` (seconds) replaces the config's for this request, as the SDK's ``timeout=``.
        ``loop``: the running loop, when the caller has it (see ``ConnectionPool.send``).
        """
        if timeout is None:
            timeout = self.config.timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ConfigError(f"timeout={timeout!r} must be a positive number of seconds")
        payload = _json_compact(body).encode()
        target = path if root else self._prefix + path
        start = self._post_heads.get(target)
        if start is None:
            start = self._post_heads[target] = request_head("POST", target, self._host_header, self._headers)
        request = b"%sContent-Length: %d\r\n\r\n%s" % (start, len(payload), payload)
        stream = bool(body.get("stream"))
        deadline = time.monotonic() + timeout if stream else 0.0  # the whole stream's
        timers, loop = self._timers, loop or asyncio.get_running_loop()
        if timeout != self.config.timeout:
            timers, message = None, f"no response within timeout={timeout:g} s"  # the queue serves the config's
        else:
            if timers is None or timers.loop is not loop or timers.seconds != timeout:
                timers = self._timers = _DeadlineQueue(loop, timeout)
                self._timeout_message = f"no response within timeout={timeout:g} s"
            message = self._timeout_message
        with _Deadline(timeout, message, self.url, timers):
            head, data, conn = await self._pool.send(request, fresh, loop, stream)
        if head.status >= 300:
            raise APIStatusError(head.status, error_message(data), self.url, parse_retry_after(head.headers))
        if conn is not None:
            return EventStream(self._pool.iter_body(conn, head), conn, deadline, self.url, on_stream_close)
        if tokens:  # its protocol reads it (and its aborts)
            return decode_token_answer(data, self.url)
        return decode_response(data, self.url, aborts=True)

    async def check_health(self) -> bool:
        """Whether the health path answers 2xx (``GET /v1/models`` once it answered 404).

        ``health_error`` says why not.
        """
        if self._prober is None:
            self._prober = HealthProber([self.url], self.config.health_path, self.config.health_timeout,
                                        self._prefix + "/models")
        return (await self._prober.probe())[0]

    @property
    def health_error(self) -> str:
        return self._prober.errors[0] if self._prober is not None else ""

    async def wandb_metrics(self, metrics_dict: Optional[Dict[str, Any]], server_name: Optional[str]) -> Dict[str, Any]:
        """Atropos' per-server W&B metrics, added to ``metrics_dict`` (and returned).

        ``server/{name}_request_time_avg|std|99p`` (and ``eval_request_time_*``) over this
        server's last ``rolling_buffer_length`` successful requests of each split, in seconds;
        ``server/{name}_average_num_attempts`` (and, Atropos' name for the eval one,
        ``eval_retry_rate``): HTTP requests per successful request.  A split without
        requests yet adds nothing, as in Atropos.
        """
        name = server_name or "server"
        metrics = {} if metrics_dict is None else metrics_dict
        for split, prefix, attempts_name in (("train", "", "average_num_attempts"),
                                             ("eval", "eval_", "eval_retry_rate")):
            times = sorted(self.stats.split_latencies[split])
            if times:
                mean = sum(times) / len(times)
                metrics[f"server/{name}_{prefix}request_time_avg"] = mean
                variance = sum((t - mean) ** 2 for t in times) / len(times)
                metrics[f"server/{name}_{prefix}request_time_std"] = math.sqrt(variance)
                metrics[f"server/{name}_{prefix}request_time_99p"] = percentile(times, 99)
            done, failed = self.stats.split_counts[split]
            if done:
                metrics[f"server/{name}_{attempts_name}"] = (done + failed) / done
        return metrics

    def close(self) -> None:
        self._pool.close()


class RequestStats:
    """One server's request statistics: recorded by the manager, read by ``ServerManager.stats``
    and ``OpenAIServer.wandb_metrics``.

    ``done``, ``failed`` (attempts), ``retried`` (failed attempts sent again); the latencies of
    the last ``buffer`` successful requests, overall and per split; per split, [requests done,
    attempts failed] (Atropos' W&B metrics).
    """

    __slots__ = ("done", "failed", "retried", "latencies", "split_counts", "split_latencies")

    def __init__(self, buffer: int):
        self.done = self.failed = self.retried = 0
        self.latencies: deque = deque(maxlen=buffer)
        self.split_counts = {"train": [0, 0], "eval": [0, 0]}
        self.split_latencies = {split: deque(maxlen=buffer) for split in ("train", "eval")}

    def succeeded(self, split: str, seconds: float) -> None:
        self.done += 1
        self.latencies.append(seconds)
        self.split_latencies[split].append(seconds)
        self.split_counts[split][0] += 1

    def attempt_failed(self, split: str, retried: bool) -> None:
        self.failed += 1
        self.split_counts[split][1] += 1
        self.retried += retried


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, interpolated linearly (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# =============================================================================================
# Health probes: one GET per server on a fresh connection, bounded; the manager's, wait's, watcher's
# =============================================================================================


async def probe_http(base_url: str, path: str, timeout: float) -> int:
    """The status of ``GET path`` at ``base_url``'s server, bounded by ``timeout`` as a whole.

    ``HealthProber`` builds the manager's, ``wait``'s and the watcher's probes on it.
    """
    return (await http_get(base_url, path, timeout))[0]


class HealthProber:
    """Probe many servers' health paths concurrently, each bounded by the probe timeout.

    A server answering 404 on its path (vLLM has no ``/health_generate``; llama.cpp no
    ``/health``) is probed on ``fallback_path`` from then on, and that is said once.
    ``errors`` keeps the last failure per server, for messages.
    """

    def __init__(self, urls: Sequence[str], path: str, timeout: float, fallback_path: str):
        self.urls = list(urls)
        self.paths = [path] * len(self.urls)
        self.errors = [""] * len(self.urls)
        self.timeout, self.fallback_path = timeout, fallback_path

    async def probe(self) -> List[bool]:
        return list(await asyncio.gather(*(self._probe_one(i) for i in range(len(self.urls)))))

    async def _probe_one(self, i: int) -> bool:
        try:
            status = await probe_http(self.urls[i], self.paths[i], self.timeout)
            if status == 404 and self.paths[i] != self.fallback_path:
                log.info("%s has no %s (404): probing %s instead", self.urls[i], self.paths[i], self.fallback_path)
                self.paths[i] = self.fallback_path
                status = await probe_http(self.urls[i], self.paths[i], self.timeout)
        except ServerError as e:
            self.errors[i] = str(e)
            return False
        self.errors[i] = "" if 200 <= status < 300 else f"HTTP {status} from {self.urls[i]} {self.paths[i]}"
        return not self.errors[i]


class EndpointFallback:
    """Which of a server's alternative endpoints it has, learnt from 404s: a server capability,
    not a retry (the health probes' own 404 fallback is ``HealthProber``'s, above).

    ``call(send)`` runs ``send(index)`` with the endpoint in use; a 404 moves this server to the
    next endpoint for good (said once) and sends again at once.  Until one endpoint has
    answered, a single call finds out and concurrent calls wait for its answer, so a server
    meets one 404 per endpoint it lacks, not one per call in flight.
    """

    def __init__(self, url: str, names: Sequence[str]):
        self.url, self.names, self.index = url, list(names), 0
        self._known = False
        self._learning: Optional[asyncio.Future] = None  # while the first call finds out

    async def call(self, send: Callable[[int], Awaitable[Any]]) -> Any:
        while True:
            if not self._known and self._learning is not None:
                await asyncio.shield(self._learning)
                continue
            index, learning = self.index, None
            if not self._known:
                learning = self._learning = asyncio.get_running_loop().create_future()
            try:
                result = await send(index)
            except APIStatusError as error:
                if error.status != 404 or index + 1 >= len(self.names):
                    raise
                if self.index == index:
                    log.info("%s has no %s (404): using %s from now on", self.url, self.names[index],
                             self.names[index + 1])
                    self.index = index + 1
                continue
            finally:
                if learning is not None:
                    self._learning = None
                    learning.set_result(None)
            self._known = self._known or self.index == index
            return result


async def wait_for_servers(urls: Sequence[str], *, min_healthy: int, timeout: float, interval: float,
                           health_path: str, probe_timeout: float, out=None) -> List[str]:
    """Probe until ``min_healthy`` servers answer; return the URLs still down (empty = success).

    Prints a progress line whenever the count changes; ends at ``timeout`` at the latest.
    """
    out = out or sys.stderr
    prober = HealthProber(urls, health_path, probe_timeout, "/v1/models")
    started, shown = time.monotonic(), None
    while True:
        # A server that accepts and never answers must not stretch the wait past --timeout.
        prober.timeout = min(probe_timeout, max(0.01, timeout - (time.monotonic() - started)))
        health = await prober.probe()
        count, elapsed = sum(health), time.monotonic() - started
        if count != shown:
            print(f"wait: {count}/{len(urls)} servers healthy after {elapsed:.1f} s", file=out, flush=True)
            shown = count
        if count >= min_healthy:
            return []
        if elapsed + interval > timeout:
            return [prober.errors[i] or urls[i] for i, ok in enumerate(health) if not ok]
        await asyncio.sleep(interval)


# The queue a server reports: vLLM's Prometheus text at /metrics, SGLang's JSON at /get_load.
_VLLM_QUEUE = re.compile(rb"^vllm:num_requests_(running|waiting)(?:\{[^}\n]*\})? ([0-9.eE+-]+)\s*$", re.M)
MAX_LOAD_READS_PER_SECOND = 100  # over all servers: at 4,096 servers each is read every 41 s at most
MAX_REPORTED_LOAD = 1 << 20  # requests running and waiting on one server: more is no server's report


def parse_server_load(path: str, body: bytes) -> Optional[int]:
    """Requests running plus waiting on a server, from its ``/metrics`` (vLLM:
    ``vllm:num_requests_running`` + ``vllm:num_requests_waiting``, summed over engines) or its
    ``/get_load`` (SGLang: ``num_reqs``, which its scheduler counts as running + waiting, so
    ``num_waiting_reqs`` is in it already; per data-parallel rank or not);
    None when the body has neither, or numbers no server would report (negative, NaN, infinite,
    over ``MAX_REPORTED_LOAD``, not numbers): a hint is dropped, never trusted."""
    try:
        if path == "/metrics":
            found = _VLLM_QUEUE.findall(body)
            total: Any = sum(float(value) for _, value in found) if found else None
        else:
            data = json.loads(body)
            ranks = data if isinstance(data, list) else [data]
            counts = [(r["num_reqs"], r.get("num_waiting_reqs", 0)) for r in ranks if isinstance(r, dict)
                      and "num_reqs" in r]
            total = sum(requests for requests, _ in counts) if counts and all(
                type(n) is int for pair in counts for n in pair) else None
    except (ValueError, RecursionError):  # not numbers; JSON nested past the recursion limit
        return None
    return int(total) if total is not None and 0 <= total <= MAX_REPORTED_LOAD else None


async def read_server_load(base_url: str, paths: List[str], timeout: float) -> Optional[int]:
    """The load ``parse_server_load`` finds at ``paths[0]``; a path answering 404 or with no load
    in it is dropped from ``paths`` (vLLM has no /get_load, SGLang no vLLM metrics)."""
    while paths:
        status, body = await http_get(base_url, paths[0], timeout)
        load = parse_server_load(paths[0], body) if status == 200 else None
        if load is not None:
            return load
        if status not in (200, 404):
            return None  # failing now: the same path next time
        paths.pop(0)
    return None


def probe_waits(interval: float, rng: Optional[random.Random] = None) -> Iterator[float]:
    """The waits before each health probe of a down server: 0.1 s doubling up to ``interval``,
    each times a jitter in [0.5, 1.5].

    Servers marked down together (a node, a switch, a network blip) so drift apart instead of
    probing in one burst per interval and all coming back, and taking load, at one instant.
    A down server is probed at most twice per ``interval``, and once per interval on average.
    """
    uniform, step = (rng or random).uniform, min(0.1, interval)
    while True:
        yield step * uniform(0.5, 1.5)
        step = min(step * 2, interval)



# =============================================================================================
# Slots: which server may take a request now (bookkeeping only: no I/O, no timers)
# =============================================================================================

SPLITS = ("train", "eval")


class ServerSlot:
    """``Slots``' record of one server: the dispatch state, written by ``Slots`` only.

    ``healthy`` and ``last_error`` (why it was marked down), ``in_flight[split]`` against
    ``caps[split]``, ``queued[split]`` (whether it is in that split's line).  ``server`` is the
    thing dispatched to (an ``OpenAIServer`` in the manager; anything in tests).
    """

    __slots__ = ("server", "index", "healthy", "last_error", "in_flight", "caps", "queued")

    def __init__(self, server: Any, index: int, train_cap: int, eval_cap: int):
        self.server, self.index, self.healthy, self.last_error = server, index, True, ""
        self.in_flight = {"train": 0, "eval": 0}
        self.caps = {"train": train_cap, "eval": eval_cap}
        self.queued = {"train": False, "eval": False}

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"down ({self.last_error})"
        return f"<{getattr(self.server, 'url', self.server)} {state} in_flight={sum(self.in_flight.values())}>"


class Slots:
    """The dispatch state of every server: health, requests in flight per split against caps,
    and the callers waiting for a slot, first come first served.

    The one owner of that state: the manager changes it only through ``take``/``wait``/
    ``give_back``/``set_caps``/``set_healthy``, and reads it through ``records`` (one
    ``ServerSlot`` per server, in server order), ``of(server)``, ``healthy_count``,
    ``in_flight_totals`` (requests in flight per split over every server: a dict kept as slots
    are taken and given back, for reading only) and ``healthy_records()``.

    Each split keeps a round-robin line of the servers that are healthy and have a free slot,
    so taking a slot, giving one back and marking a server down or up cost the same whatever
    the number of servers.  A server enters its split's line at most once (``queued``) and
    leaves it when full or found down.  A caller that finds no free slot, or others already
    waiting, gets a future in a FIFO; a slot given back goes to the first waiter in the same
    loop iteration, already counted.  Nothing here sleeps, polls or touches a socket.

    Which server a request gets is decided in one place, ``select``: replace that method to
    change the policy.
    """

    def __init__(self, servers: Sequence[Any], caps: Optional[Sequence[Tuple[int, int]]] = None):
        """``caps``: (train, eval) per server; by default each server's config's
        ``num_max_requests_at_once`` and ``num_requests_for_eval``."""
        if caps is None:
            caps = [(s.config.num_max_requests_at_once, s.config.num_requests_for_eval) for s in servers]
        self.records = [ServerSlot(server, i, train, eval) for i, (server, (train, eval)) in enumerate(zip(servers, caps))]
        self._by_server = {record.server: record for record in self.records}
        self.healthy_count = len(self.records)
        self.in_flight_totals = {split: 0 for split in SPLITS}
        self._ready: Dict[str, deque] = {split: deque(self.records) for split in SPLITS}
        for record in self.records:
            record.queued = {split: True for split in SPLITS}
        # Waiters in line, oldest first; an ordered dict, so that one leaving from the middle
        # (cancelled, timed out) costs O(1): a mass cancellation stays linear.
        self._waiters: Dict[str, "OrderedDict[asyncio.Future, None]"] = {split: OrderedDict() for split in SPLITS}

    # -- reads ---------------------------------------------------------------------------------

    def of(self, server: Any) -> ServerSlot:
        """The record of ``server``."""
        return self._by_server[server]

    def waiting(self, split: str) -> int:
        return sum(not w.done() for w in self._waiters[split])

    def healthy_records(self) -> List[ServerSlot]:
        """The healthy servers' records (a scan: for occasional reads, not per request)."""
        return [record for record in self.records if record.healthy]

    # -- the selection policy ------------------------------------------------------------------

    def select(self, split: str, avoid: Optional[ServerSlot] = None,
               prefer: Optional[ServerSlot] = None) -> Optional[ServerSlot]:
        """Choose a server for one request of ``split`` and count its slot; None if none has room.

        The contract, whatever the policy: the record returned is healthy and had room
        (``in_flight < cap``), and its ``in_flight[split]`` is already incremented; the
        waiters' order is not this method's business (``take`` and the hand-over call it only
        when the caller is first in line).  Today's policy:

        * ``prefer`` (a server the caller would like, e.g. where its prompt is cached) is
          taken when it is healthy, has room and is not ``avoid``; the line is not rotated;
        * else round-robin over the line of healthy servers with room;
        * ``avoid`` (the server that just failed) only when no other has room.
        """
        if prefer is not None and prefer is not avoid and prefer.healthy and prefer.in_flight[split] < prefer.caps[split]:
            prefer.in_flight[split] += 1
            self.in_flight_totals[split] += 1
            return prefer  # a full one stays in the line until the line finds it full
        ready = self._ready[split]
        while ready:
            record = ready.popleft()
            if not (record.healthy and record.in_flight[split] < record.caps[split]):  # down, full or a cap shrank
                record.queued[split] = False
                continue
            if record is avoid and ready:
                ready.append(record)  # its turn passes to the next one (at most one rotation)
                avoid = None
                continue
            record.in_flight[split] += 1
            self.in_flight_totals[split] += 1
            if record.in_flight[split] < record.caps[split]:
                ready.append(record)  # round-robin: to the back of the line
            else:
                record.queued[split] = False
            return record
        return None

    # -- taking and giving back ------------------------------------------------------------------

    def take(self, split: str, avoid: Optional[ServerSlot] = None,
             prefer: Optional[ServerSlot] = None) -> Optional[ServerSlot]:
        """A counted slot (see ``select``), or None: none free, or others wait first (a caller
        never jumps the line, whatever it prefers)."""
        if self._waiters[split]:
            return None
        return self.select(split, avoid, prefer)

    def wait(self, split: str) -> "asyncio.Future":
        """Join the line: the future gets a record (its slot counted) or None (look again)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[split][waiter] = None
        return waiter

    def leave(self, waiter: "asyncio.Future", split: str) -> None:
        """A waiter gives up (cancelled, timed out): out of the line, and a slot it was just
        handed goes to the next one."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            record = waiter.result()
            if record is not None:
                self.give_back(record, split)
            return
        waiter.cancel()  # a no-op on a waiter a deadline failed: it is done
        self._waiters[split].pop(waiter, None)

    def give_back(self, record: ServerSlot, split: str) -> None:
        record.in_flight[split] -= 1
        self.in_flight_totals[split] -= 1
        if not record.queued[split] and record.healthy and record.in_flight[split] < record.caps[split]:
            record.queued[split] = True  # _enqueue inline: this runs on every request
            self._ready[split].append(record)
        if self._waiters[split]:
            self._hand_over(split)

    # -- caps and health -------------------------------------------------------------------------

    def set_caps(self, record: ServerSlot, train: int, eval: int) -> None:
        """Change a server's caps; calls waiting for a slot see a larger cap at once."""
        record.caps = {"train": train, "eval": eval}
        for split in SPLITS:
            self._enqueue(record, split)
            self._hand_over(split)

    def set_healthy(self, record: ServerSlot, healthy: bool, reason: str = "") -> None:
        """Mark a server up (it rejoins the lines, waiters are served) or down (it is skipped);
        ``reason`` (why down) is kept as ``last_error``.

        When the last healthy server goes down, every waiter is woken with None: with none
        healthy, the manager starts their ``no_server_timeout``.
        """
        if reason:
            record.last_error = reason
        if record.healthy == healthy:
            return
        record.healthy = healthy
        self.healthy_count += 1 if healthy else -1
        if healthy:
            for split in SPLITS:
                self._enqueue(record, split)
                self._hand_over(split)
        elif not self.healthy_count:
            self.wake_all()

    def note_error(self, record: ServerSlot, reason: str) -> None:
        """Keep why a request to (or a probe of) this server failed, for messages and stats."""
        record.last_error = reason

    def wake_all(self) -> None:
        """Resolve every waiter with None, so that each looks at the servers again."""
        for waiters in self._waiters.values():
            while waiters:
                waiter, _ = waiters.popitem(last=False)
                if not waiter.done():
                    waiter.set_result(None)

    # -- the lines -------------------------------------------------------------------------------

    def _enqueue(self, record: ServerSlot, split: str) -> None:
        if not record.queued[split] and record.healthy and record.in_flight[split] < record.caps[split]:
            record.queued[split] = True
            self._ready[split].append(record)

    def _hand_over(self, split: str) -> None:
        waiters = self._waiters[split]
        while waiters:
            waiter = next(iter(waiters))
            if waiter.done():  # failed by its deadline, not yet gone (leave() follows)
                del waiters[waiter]
                continue
            record = self.select(split)
            if record is None:
                return
            del waiters[waiter]
            waiter.set_result(record)


# =============================================================================================
# Routing: the server a request would like (prefix affinity), learnt from requests and answers
# =============================================================================================

ROUTE_BLOCK_CHARS = 128  # a text prompt is keyed at every 128th character (about 32 tokens)
ROUTE_BLOCK_IDS = 32  # a token-id prompt at every 32nd id
ROUTE_INDEX_ENTRIES = 65536  # keys remembered at least (8 MB), and 256 per server (32 KB each) at many servers
ROUTE_LOAD_SLACK = 4  # requests over the bound allowed: the parts of a split call stay together on idle servers
ROUTE_PLACE_LOOKS = 8  # servers a new conversation's placement looks at, at most, for two within the bound


def _message_unit(message: Any) -> Tuple[Any, str]:
    """What of a chat message decides the server's cache: role and content.  An assistant's
    content is stripped, as environments often strip the answer they append; the others come
    back as they were sent (not copying them keeps Python's cached hash of the string)."""
    if not isinstance(message, dict):
        return (None, repr(message))
    content = message.get("content")
    if not isinstance(content, str):
        try:
            content = "" if content is None else json.dumps(content, sort_keys=True, default=str)
        except (TypeError, ValueError):  # keys of mixed types ({1: .., "a": ..}) cannot be sorted
            content = repr(content)
    role = message.get("role")
    return (role, content.strip() if role == "assistant" else content)


def _chain(start: int, units: Sequence[Any], size: int, keys: List[int]) -> Tuple[int, Any]:
    """Chain-hash ``units`` in blocks of ``size`` from ``start``, appending the hash at each
    full block to ``keys``; the last full block's hash and the rest (a partial block)."""
    key, full = start, len(units) - len(units) % size
    for i in range(0, full, size):
        key = hash((key, units[i:i + size]))
        keys.append(key)
    return key, units[full:]


class BlockKeys(list):
    """The keys of a text prompt (every ``ROUTE_BLOCK_CHARS`` characters) or of token ids (every
    ``ROUTE_BLOCK_IDS``), deepest first; ``base`` and ``rest``: the last full block's key and
    the partial block after it, where an answer's text goes on."""

    __slots__ = ("base", "rest", "size")

    def after(self, choice: Dict[str, Any]) -> Optional[int]:
        """The key at which a next request continues that repeats this one and the ``text`` of
        ``choice`` (None for token ids, whose answers are not learnt, and for an answer that
        fills no block)."""
        answer = choice.get("text")
        if self.size != ROUTE_BLOCK_CHARS or not isinstance(answer, str):
            return None
        if len(self.rest) + len(answer) < self.size:  # no new full block: the key would be one the prompt shares
            return None
        return _chain(self.base, self.rest + answer, self.size, [])[0]


def route_keys(kwargs: Dict[str, Any]) -> Optional[List[int]]:
    """A request's keys, deepest first: the whole prompt's, then a hash at each earlier
    boundary where an earlier request (or request plus answer) may have ended; None when it
    has no ``messages``, ``prompt`` (text or ids) or ``input_ids`` (nothing to route by).

    Chat: a boundary after every message, the keys a plain list (one is built for every
    request, and building and indexing a subclass of ``list`` costs about 1k instructions
    more); ``PrefixRouter.answered`` keys an answer as the message it becomes.  Text or token
    ids: ``BlockKeys``."""
    messages = kwargs.get("messages")
    if isinstance(messages, list):
        keys, key = [], 0
        for message in messages:
            try:
                role, content = message["role"], message["content"]
            except (KeyError, TypeError):  # not a message object: _message_unit says what is keyed
                role = content = None
            if type(content) is str:  # the usual case inline
                if role == "assistant":
                    content = content.strip()
            else:
                role, content = _message_unit(message)
            try:
                key = hash((key, role, content))
            except TypeError:  # a role that is no string: the server will say what is wrong
                key = hash((key, repr(role), content))
            keys.append(key)
        keys.reverse()
        return keys or None
    prompt = kwargs.get("input_ids", kwargs.get("prompt"))
    if isinstance(prompt, str):
        size = ROUTE_BLOCK_CHARS
    elif isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt):
        prompt, size = tuple(prompt), ROUTE_BLOCK_IDS
    else:
        return None
    keys = BlockKeys()
    keys.base, keys.rest = _chain(0, prompt, size, keys)
    keys.size = size
    keys.append(hash((keys.base, keys.rest, "end")))
    keys.reverse()
    return keys


class PrefixRouter:
    """Prefix affinity: the server a request would like, so that its prompt's start is still in
    that server's prefix cache (vLLM's and SGLang's automatic prefix caching).

    The manager tells it where each request went (``placed``: the whole prompt's key, so the
    other parts of a split call and repeats of a prompt follow) and each answer (``answered``:
    the key of prompt plus answer, where the conversation's next turn continues).  ``choose``
    looks a request's keys up from the deepest: a hit names the server of the earlier request
    this one continues.  Only ends of requests are keys, never a prefix many share (a system
    prompt), so a new conversation finds nothing: of the next two servers round-robin within
    the bound below, it goes to the one that has had fewer requests, which spreads
    conversations and evens out their different lengths (placing by the fewest in flight
    alone concentrates a burst of new ones).

    Bounded load, as in consistent hashing with bounded loads: with ``mean`` the requests in
    flight per healthy server (both splits, this request counted), a new conversation skips
    servers that would go over ``ceil((1 + epsilon) x mean)``, and a continuation leaves its
    server (``spill``) only over that plus ``ROUTE_LOAD_SLACK`` (the slack keeps a split call's
    parts together while the servers are nearly idle).  With ``server_load_interval``, the
    requests of other processes that the servers report (``report``) count too.  A server
    down or at its cap is declined by ``Slots``, which then takes the next in its line; the
    conversation follows the request (its next turn finds the new key).

    Memory: at most ``entries`` keys (an ``OrderedDict`` of int -> server, 124 bytes a key
    measured; by default ``ROUTE_INDEX_ENTRIES``, or 256 per server over 256 servers: 8 MB, 130
    MB at 4,096 servers), least recently used dropped first; one request adds one key plus one
    per answer.  The placement's turns hold 8 references a server (0.6 MB at 4,096 servers).
    """

    def __init__(self, servers: Sequence[Any], epsilon: float = 0.25, entries: Optional[int] = None):
        self.servers, self.epsilon = list(servers), epsilon
        self.entries = entries or max(ROUTE_INDEX_ENTRIES, 256 * len(self.servers))
        self._where: "OrderedDict[int, Any]" = OrderedDict()  # key -> server
        # The placement's turns, round-robin: each server and the ones after it, as many as a
        # placement looks at (ROUTE_PLACE_LOOKS references a server; one empty turn for none).
        looks = min(len(self.servers), ROUTE_PLACE_LOOKS)
        ring = self.servers + self.servers[:looks - 1]
        self._turns = itertools.cycle([ring[i:i + looks] for i in range(max(len(self.servers), 1))])
        self._sent: Dict[Any, int] = dict.fromkeys(self.servers, 0)  # requests placed per server
        self.reported: Dict[Any, int] = {}  # the load each server reports (``report``), when read
        self.reported_total = 0
        self.matched = self.spilled = 0  # requests sent to their prefix's server / declined by the bound

    @property
    def remembered(self) -> int:
        """Keys in the index now (at most ``entries``)."""
        return len(self._where)

    def choose(self, route: List[int], slots: "Slots") -> Tuple[Any, Any]:
        """``(prefer, spill)`` for ``Slots.take``: the server of the deepest key found within the
        bound and None; else a server for a new conversation (or None: ``Slots`` picks) and the
        found server over its bound (or None).

        A new conversation goes to the one of the next two servers round-robin, healthy and
        under the bound, that has had fewer requests placed: conversations differ in length, and
        two choices keep the servers' totals even (the power of two choices).  In one method
        with the lookup: it runs on every request, and a call costs about 1k instructions.
        """
        where, found = self._where, None
        for key in route:
            found = where.get(key)
            if found is not None:
                where.move_to_end(key)
                break
        # The bound: a server may hold ceil((1 + epsilon) x mean) with this request counted.  A
        # load (an integer) is under that exactly when it is under the product unrounded.
        totals, reported = slots.in_flight_totals, self.reported_total
        bound = (1 + self.epsilon) * (totals["train"] + totals["eval"] + reported + 1) / (slots.healthy_count or 1)
        if found is not None and found.healthy:
            load = self._load(found) if reported else found.in_flight["train"] + found.in_flight["eval"]
            if load - ROUTE_LOAD_SLACK < bound:
                self.matched += 1
                return found, None
            self.spilled += 1  # over the bound: placed as new, and avoided unless it alone has room
        else:
            found = None
        sent, best = self._sent, None
        for server in next(self._turns):  # the line moves by one a placement
            if server.healthy and (self._load(server) if reported else
                                   server.in_flight["train"] + server.in_flight["eval"]) < bound:
                if best is not None:
                    return (server if sent[server] < sent[best] else best), found
                best = server
        return best, found

    def _load(self, server: Any) -> int:
        """Requests in flight on ``server``: this manager's, and others' as last reported."""
        return server.in_flight["train"] + server.in_flight["eval"] + self.reported.get(server, 0)

    def placed(self, route: List[int], server: Any) -> None:
        """The request went to ``server``: its whole prompt's key names it, and it has had one
        more request placed."""
        where = self._where
        where[route[0]] = server  # a key found again was moved to the end by choose
        if len(where) > self.entries:
            where.popitem(last=False)
        self._sent[server] += 1

    def report(self, server: Any, load: Optional[int]) -> None:
        """Requests on ``server`` that are not this manager's (its reported load less this
        manager's in flight there; None: unknown, as when it is down)."""
        old = self.reported.pop(server, None)
        if load is not None:
            self.reported[server] = load
        self.reported_total += (load or 0) - (old or 0)

    def answered(self, route: List[int], server: Any, response: Any) -> None:
        """Learn where each choice's conversation continues (chat and text completions)."""
        try:
            choices = response["choices"]
        except (KeyError, TypeError):  # no choices, or not a response object (a token call's result)
            return
        where = self._where
        for choice in choices or ():  # objects, or "choices": null (decode_response checked them)
            if type(route) is list:  # a chat: its messages and the answer, as route_keys keys them
                try:
                    answer = choice["message"]["content"]
                except (KeyError, TypeError):  # no message, or not an object
                    answer = None
                key = hash((route[0], "assistant", answer.strip() if isinstance(answer, str) else
                            _message_unit({"content": answer})[1]))
            else:  # BlockKeys: a text prompt's or token ids'
                key = route.after(choice)
            if key is not None:
                where[key] = server
        while len(where) > self.entries:
            where.popitem(last=False)



# =============================================================================================
# Retry policy: after each failed attempt one object decides; a budget bounds retries overall
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Retry:
    """What to do after a failed HTTP request: ``action`` is RAISE, RESEND or RETRY."""

    action: str
    mark_down: bool = False
    delay: float = 0.0

    RAISE = "raise"  # not worth sending again (4xx, too large, retry-after too long), or no retry left
    RESEND = "resend"  # at once, same server, fresh connection (a stale pooled one)
    RETRY = "retry"  # after ``delay``, on another server if one is healthy


class RetryBudget:
    """Retries allowed across every call of a manager, as Finagle's ``RetryBudget`` (Envoy's
    ``retry_budget``, gRPC's retry throttling): each request deposits ``percent`` of a retry,
    each retry withdraws one, both are forgotten after ``ttl`` seconds, and a reserve of
    ``min_per_second * ttl`` retries lets a lone call retry.

    So over any ``ttl`` seconds, retries <= ``percent`` x requests + ``min_per_second`` x
    ``ttl``: when every server fails (429/503 everywhere) the calls cost at most about 1.2x
    their requests plus 10 retries per second, not ``max_retries + 1`` times their requests.
    Counted in one-second slices, O(1) per request; ``clock`` is injectable for tests.
    """

    UNIT = 1000  # a retry, in the integer units counted (so that 5 deposits of 0.2 make exactly 1)

    def __init__(self, percent: float = 0.2, min_per_second: float = 10.0, ttl: int = 10,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._deposit = round(percent * self.UNIT)
        self._reserve = round(min_per_second * ttl * self.UNIT)
        self._stamps = [-1] * ttl  # the second each slice counts (-1: none yet)
        self._sums = [0] * ttl  # deposits minus withdrawals in that second
        self._second, self._index = -1, 0  # the last second deposited in, and its slice

    def deposit(self) -> None:
        """One request went out (a call's, or a split call part's, first attempt)."""
        second = int(self.clock())
        if second != self._second:  # once a second: the slice (runs on every request)
            self._second, self._index = second, self._slice(second)
        self._sums[self._index] += self._deposit

    def try_withdraw(self) -> bool:
        """Whether one retry may go out now; counts it when so."""
        second = int(self.clock())
        i = self._slice(second)
        oldest = second - len(self._stamps)
        if self._reserve + sum(total for stamp, total in zip(self._stamps, self._sums) if stamp > oldest) < self.UNIT:
            return False
        self._sums[i] -= self.UNIT
        return True

    def _slice(self, second: int) -> int:
        i = second % len(self._stamps)
        if self._stamps[i] != second:  # a slice of an older window: forget it
            self._stamps[i], self._sums[i] = second, 0
        return i


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """openai-python's policy: which failures are retried, which mark a server down, how long to wait.

    Retried: connection errors, timeouts, protocol errors, 408, 429, 5xx and aborted generations,
    after ``min(backoff * 2**(attempt-1), backoff_max)`` seconds times a jitter in [0.75, 1]
    (drawn from ``rng``), or the server's ``Retry-After`` if longer (over ``MAX_RETRY_AFTER`` we
    give up instead); at most ``max_retries`` times per call.
    Marked down: servers that failed to answer (connection, timeout, protocol) or answered 5xx.
    Not a sign of death: a stale pooled connection, 408/429, an abort (a paused server).
    Not retried: other 4xx, a too large body, a malformed token answer (``TokenProtocolError``).
    A call's requests are counted by ``Attempts``; the manager-wide bound is ``budget``.
    """

    max_retries: int = 2
    backoff: float = 0.5
    backoff_max: float = 8.0
    rng: random.Random = dataclasses.field(default_factory=random.Random, compare=False, repr=False)
    budget: Optional[RetryBudget] = dataclasses.field(default=None, compare=False, repr=False)

    def decide(self, error: ServerError, attempt: int, jitter: Optional[float] = None) -> Retry:
        """The decision after ``attempt`` (1-based) failed with ``error``, regardless of what
        is left of the call's retries and of the budget (``Attempts`` applies both);
        ``jitter`` in [0.75, 1], drawn from ``rng`` when not given."""
        if isinstance(error, StaleConnectionError):
            return Retry(Retry.RESEND)
        if isinstance(error, (ResponseTooLargeError, TokenProtocolError)):  # the same answer again
            return Retry(Retry.RAISE)
        mark_down, retry_after = False, None
        if isinstance(error, APIStatusError):
            if error.status < 500 and error.status not in (408, 429):
                return Retry(Retry.RAISE)
            mark_down, retry_after = error.status >= 500, error.retry_after
            if retry_after is not None and retry_after > MAX_RETRY_AFTER:
                return Retry(Retry.RAISE, mark_down)
        elif not isinstance(error, GenerationAbortedError):
            mark_down = True  # connection error, timeout, protocol error
        if jitter is None:
            jitter = self.rng.uniform(0.75, 1)
        backoff = min(self.backoff * 2 ** min(attempt - 1, 16), self.backoff_max)
        return Retry(Retry.RETRY, mark_down, max(backoff * jitter, retry_after or 0.0))

    def attempts(self, left: Optional[List[int]] = None) -> "Attempts":
        """The attempts of one request; the parts of a split call pass one ``left``, the call's
        retries (``[max_retries]`` when not given)."""
        return Attempts(self, [self.max_retries] if left is None else left)


class Attempts:
    """One request's attempts, as urllib3's ``Retry`` is: ``failed(error)`` counts the attempt
    and says what to do; the caller only obeys.

    A decision to send again becomes RAISE when the call has no retry left (``max_retries``
    per call, shared by a split call's parts: ``left`` is one list for all of them) or, for a
    RETRY, when the manager's ``RetryBudget`` refuses (the request's deposit in the budget is
    the caller's: most requests never fail, and need no ``Attempts``).  ``made``: the HTTP
    requests made so far by this request.
    """

    __slots__ = ("policy", "left", "made", "refused")

    def __init__(self, policy: RetryPolicy, left: List[int]):
        self.policy, self.left, self.made = policy, left, 0
        self.refused = False  # the budget said no: the error says so

    def failed(self, error: ServerError) -> Retry:
        self.made += 1
        decision = self.policy.decide(error, self.made)
        if decision.action == Retry.RAISE:
            return decision
        budget = self.policy.budget
        if self.left[0] <= 0:
            return Retry(Retry.RAISE, decision.mark_down)
        if decision.action == Retry.RETRY and budget is not None and not budget.try_withdraw():
            self.refused = True
            return Retry(Retry.RAISE, decision.mark_down)
        self.left[0] -= 1
        return decision

    def gave_up(self, error: ServerError) -> ServerError:
        """``error``, saying how many requests were made when more than one, and when the
        budget refused a retry (a storm: every server failing for many calls at once)."""
        error = error.after_attempts(self.made, self.policy.max_retries + 1)
        if self.refused:
            error.args = (f"{error.args[0]} (not retried: this manager's retry budget is spent; "
                          "ATROPOS_SLURM_RETRY_BUDGET)",)
        return error


# =============================================================================================
# Manager: round-robin over healthy servers with free slots, bounded retries, health probes
# =============================================================================================

LOCAL_DEFAULT_URLS = [f"http://localhost:{port}/v1" for port in range(9004, 9008)]  # Atropos' local default


def merge_responses(parts: Sequence[APIResponse]) -> APIResponse:
    """Join the responses of one split request: choices renumbered 0..n-1, integer usage summed
    (a part's ``usage`` that is not an object, or whose count is not an integer: ``ProtocolError``)."""
    merged = APIResponse(parts[0])
    choices = []
    for part in parts:
        for choice in part.get("choices") or []:
            choices.append(AttrDict(choice, index=len(choices)))
    merged["choices"] = choices
    usages = [p.get("usage") for p in parts if p.get("usage") is not None]
    if usages:
        usage = AttrDict(usages[0]) if isinstance(usages[0], dict) else None
        for i, part_usage in enumerate(usages):
            if not isinstance(part_usage, dict):
                raise ProtocolError(f"a split call's part {i} has a usage that is not an object: {_shown(part_usage)}")
        for key, value in usages[0].items():
            if isinstance(value, int) and not isinstance(value, bool):
                counts = [u.get(key) or 0 for u in usages]
                bad = next((c for c in counts if isinstance(c, bool) or not isinstance(c, int)), None)
                if bad is not None:
                    raise ProtocolError(f"a split call's part has usage.{key}={_shown(bad)}, not an integer")
                usage[key] = sum(counts)
        merged["usage"] = usage
    merged.raw = b"[" + b",".join(p.raw for p in parts) + b"]"
    return merged


class SlotSource:
    """Where ``ServerManager``'s request path gets a server's slot from, and gives it back to:
    the manager's shared slots (``SharedSlots``), or the one slot of a ``DedicatedServer``.

    ``take`` answers at once (a counted ``ServerSlot``, or None when the caller must wait);
    ``acquire`` waits for one; ``give_back`` returns it.  ``avoid``: the server that just failed.
    """

    def take(self, split: str, avoid: Optional[ServerSlot]) -> Optional[ServerSlot]:
        return None

    async def acquire(self, split: str, avoid: Optional[ServerSlot]) -> ServerSlot:
        raise NotImplementedError

    def give_back(self, slot: ServerSlot, split: str) -> None:
        raise NotImplementedError


class SharedSlots(SlotSource):
    """The manager's slot source: ``Slots``, and the waits when none is free.

    A caller that finds no free slot waits in line at most ``slot_timeout``; with no server
    healthy, at most ``no_server_timeout`` counted from the first moment this caller saw none
    healthy, while ``probe_down()`` has the probes try to bring one back.
    """

    def __init__(self, slots: Slots, slot_timeout: float, no_server_timeout: float, probe_down: Callable[[], None]):
        self.slots, self.slot_timeout, self.no_server_timeout = slots, slot_timeout, no_server_timeout
        self.take, self.give_back, self._probe_down = slots.take, slots.give_back, probe_down

    async def acquire(self, split: str, avoid: Optional[ServerSlot], prefer: Optional[ServerSlot] = None) -> ServerSlot:
        slots, all_down_since = self.slots, None
        while True:
            slot = slots.take(split, avoid, prefer)
            if slot is not None:
                return slot
            waiter = slots.wait(split)
            try:
                if slots.healthy_count:
                    with _Deadline(self.slot_timeout, f"no free slot within timeout={self.slot_timeout:g} s "
                                                      f"(every healthy server at its cap for split={split!r})"):
                        slot = await waiter
                else:
                    all_down_since = all_down_since or time.monotonic()
                    self._probe_down()
                    try:
                        with _Deadline(all_down_since + self.no_server_timeout - time.monotonic(), "no healthy server"):
                            slot = await waiter
                    except ServerTimeoutError:
                        raise NoHealthyServerError(self._no_server_message()) from None
            except BaseException:
                slots.leave(waiter, split)
                raise
            if slot is not None:
                return slot  # the giver already counted our slot

    def _no_server_message(self) -> str:
        lines = "; ".join(f"{s.server.url}: {s.last_error or 'down'}" for s in self.slots.records)
        return f"no healthy server after {self.no_server_timeout:g} s ({lines})"


class Call:
    """One request of a call, as ``ServerManager._request`` sends it: the split whose slot it
    takes, how it is sent to a server, and the call's retries left (shared by a split call's parts)."""

    __slots__ = ("path", "kwargs", "split", "stream", "loop", "left")

    def __init__(self, path: str, kwargs: Dict[str, Any], loop: Optional[asyncio.AbstractEventLoop] = None,
                 left: Optional[List[int]] = None):
        self.path, self.kwargs, self.loop, self.left = path, kwargs, loop, left
        self.split = "train" if kwargs.get("split", "train") == "train" else "eval"  # Atropos' rule
        self.stream = bool(kwargs.get("stream"))

    def send(self, server: OpenAIServer, fresh: bool, on_stream_close: Optional[Callable[[], None]]) -> Awaitable[Any]:
        """The HTTP request on ``server`` (``fresh``: on a new connection)."""
        kwargs = self.kwargs
        return server.post(self.path, server.request_body(self.path, kwargs), fresh=fresh,
                           timeout=kwargs.get("timeout"), loop=self.loop, on_stream_close=on_stream_close)


class TokenCall(Call):
    """A token call (``tokens_and_logprobs_completion``, ``get_logprobs``): sent in the token
    protocol of whichever server takes it (the first its ``EndpointFallback`` finds), and its
    answer read (``TokenReader``) before the slot is given back: an aborted generation is
    retried like a 5xx, a malformed answer raises ``TokenProtocolError``.  ``vocab``: the
    tokenizer's size, when known."""

    __slots__ = ("prompt", "params", "prompt_logprobs", "top_k", "n", "vocab", "endpoints")

    def __init__(self, kwargs: Dict[str, Any], prompt_logprobs: bool, endpoints: Callable[[OpenAIServer], EndpointFallback],
                 vocab: Optional[int] = None, left: Optional[List[int]] = None):
        super().__init__("", kwargs, None, left)
        self.prompt, self.params, self.prompt_logprobs = token_prompt(kwargs), sampling_params(kwargs), prompt_logprobs
        self.endpoints = endpoints
        self.vocab = None if vocab is None else _int_setting("vocab", vocab, minimum=1, maximum=TOKEN_ID_BOUND)
        self.top_k, self.n = 0, 1 if self.params.get("n") is None else self.params["n"]
        if prompt_logprobs:  # Atropos' names for the number of logprobs per prompt position
            self.top_k, self.n = self.params.pop("top_k", self.params.pop("top_logprobs", 1)), 1
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ConfigError(f"top_k={self.top_k!r} must be a positive integer")
        elif isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n={_shown(self.n)} must be a positive integer")

    async def send(self, server: OpenAIServer, fresh: bool, on_stream_close: Any) -> Any:
        """The answer of ``server``, read: the protocol's result."""
        protocols, first = token_protocols(server.config.server_type), [fresh]

        async def send_as(index: int) -> Any:
            protocol, model, fresh_now = protocols[index], server.config.model_name, first.pop() if first else False
            body = (protocol.logprobs_body(model, self.prompt, self.top_k, self.params) if self.prompt_logprobs
                    else protocol.completion_body(model, self.prompt, self.params))
            data = await server.post(protocol.path, body, fresh=fresh_now, root=protocol.root, tokens=True,
                                     timeout=self.kwargs.get("timeout"))
            read = TokenReader(protocol.name, server.url, self.n, self.vocab, self.prompt, self.top_k)
            return (protocol.logprobs_result if self.prompt_logprobs else protocol.completion_result)(data, read)

        return await self.endpoints(server).call(send_as)


def n_sizes(n: Any, per_request: int, stream: Any) -> Optional[List[int]]:
    """None when a call asking ``n`` choices is one request, else the ``n`` of each of its requests."""
    if stream or not isinstance(n, int) or n <= per_request:
        return None
    return [per_request] * (n // per_request) + ([n % per_request] if n % per_request else [])


class ServerManager:
    """Spread OpenAI requests over many servers; drop-in for Atropos' ``ServerManager``.

    * ``configs``: a ``ServerBaseline`` or a list of ``APIServerConfig``, resolved as Atropos
      does (``resolve_servers``: with ``slurm=True`` the servers are discovered from the job and
      the first config is the template for all of them).
    * Each request takes a slot (``Slots``) on the next healthy server, round-robin, that has
      room for its ``split`` (``num_max_requests_at_once`` for "train", ``num_requests_for_eval``
      for "eval").  When all are full it waits, without polling, for the first slot to free.
    * A failed request is handled as ``RetryPolicy`` decides: connection errors, timeouts,
      408, 429 and 5xx are retried with capped exponential backoff and jitter, on another server
      when one is healthy, honouring ``Retry-After``: at most ``max_retries + 1`` HTTP requests
      per call, a split call's parts included (the first part that fails for good cancels the
      others), and retries of all calls within the ``RetryBudget`` (``retry_budget`` of the
      requests of the last 10 s, plus 10 per second).  Other 4xx are raised at once.  A stale
      pooled connection is resent at once.
    * A call waits for a slot at most the config's ``timeout``; a stream holds its slot until
      it ends, is closed, or is dropped.
    * A connection error, timeout or 5xx marks the server down at once; a background probe of
      its health path brings it back.  With no server healthy, a request waits at most
      ``no_server_timeout`` seconds, then raises ``NoHealthyServerError`` naming every server.
    * ``n > max_n_completions`` is split over several requests and merged.
    * The keyword-only knobs default to their ``ATROPOS_SLURM_*`` variables (``manager_knobs``).
    * ``routing="prefix"`` (the default; ``ATROPOS_SLURM_ROUTING``) sends each request where its
      prompt's prefix is cached (``PrefixRouter``: continuations, split parts), within a load
      bound (``routing_epsilon``); ``server_load_interval`` > 0 also reads the servers' own
      queues (``read_server_load``); ``routing="round_robin"``: the next server in line.
    """

    def __init__(self, configs: Any, server_class: Any = OpenAIServer, slurm: bool = False,
                 testing: bool = False, max_n_completions: int = 8, reasoning_config: Any = None,
                 proxy_url: Optional[str] = None, use_proxy: bool = False, tool_parser: Optional[str] = None, *,
                 max_retries: Optional[int] = None, retry_backoff: Optional[float] = None,
                 retry_backoff_max: Optional[float] = None, no_server_timeout: Optional[float] = None,
                 health_probe_interval: Optional[float] = None, retry_budget: Optional[float] = None,
                 routing: Optional[str] = None, routing_epsilon: Optional[float] = None,
                 server_load_interval: Optional[float] = None):
        configs, server_class = resolve_servers(configs, server_class, slurm, testing, reasoning_config,
                                                proxy_url, use_proxy)
        knobs = manager_knobs(max_retries=max_retries, retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
                              no_server_timeout=no_server_timeout, health_probe_interval=health_probe_interval,
                              retry_budget=retry_budget, routing=routing, routing_epsilon=routing_epsilon,
                              server_load_interval=server_load_interval)
        self.max_n_completions = _int_setting("max_n_completions", max_n_completions, minimum=1)
        self._per_request = 1 if configs[0].n_kwarg_is_ignored else self.max_n_completions  # n per request
        self.reasoning_config, self.tool_parser = reasoning_config, tool_parser
        self.configs = configs
        self.servers = [server_class(c) for c in configs]
        self.retry_policy = RetryPolicy(knobs.max_retries, knobs.retry_backoff, knobs.retry_backoff_max,
                                        budget=RetryBudget(knobs.retry_budget))
        self.no_server_timeout, self.health_probe_interval = knobs.no_server_timeout, knobs.health_probe_interval
        self.slots = Slots(self.servers)
        for server, slot in zip(self.servers, self.slots.records):
            server.slot = slot
        self.slot_source = SharedSlots(self.slots, max(c.timeout for c in configs), knobs.no_server_timeout,
                                       self._probe_all_down)
        self.routing, self.server_load_interval = knobs.routing, knobs.server_load_interval
        self.router = PrefixRouter(self.slots.records, knobs.routing_epsilon) if knobs.routing == "prefix" else None
        self._probes: Dict[int, asyncio.Task] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False
        self._endpoints: Dict[OpenAIServer, EndpointFallback] = {}  # each server's token protocol (see TokenCall)

    @property
    def max_retries(self) -> int:
        return self.retry_policy.max_retries

    def __repr__(self) -> str:
        return (f"<ServerManager {self.slots.healthy_count}/{len(self.servers)} healthy: "
                + ", ".join(map(repr, self.slots.records)) + ">")

    # -- public API ---------------------------------------------------------------------------

    async def chat_completion(self, **kwargs: Any) -> Any:
        """POST ``/chat/completions`` with the OpenAI body in ``kwargs`` (plus ``split``)."""
        return await self.dispatch("/chat/completions", kwargs)

    async def completion(self, **kwargs: Any) -> Any:
        """POST ``/completions`` with the OpenAI body in ``kwargs`` (plus ``split``)."""
        return await self.dispatch("/completions", kwargs)

    def dispatch(self, path: str, kwargs: Dict[str, Any], source: Optional[SlotSource] = None) -> Awaitable[Any]:
        """The coroutine of one call of ``path`` with ``kwargs``, its slots from ``source`` (the
        manager's by default; a ``DedicatedServer``'s): for the usual call one request, awaited
        by the caller directly (a coroutine level less); for ``n`` over the per-request cap, the
        split and the merge."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._closed:
            self._enter()
        sizes = n_sizes(kwargs["n"], self._per_request, kwargs.get("stream")) if "n" in kwargs else None
        if sizes is None:
            return self._request(Call(path, kwargs, loop), source or self.slot_source)
        return self._dispatch_split(path, kwargs, sizes, source or self.slot_source)

    async def _dispatch_split(self, path: str, kwargs: Dict[str, Any], sizes: List[int], source: SlotSource) -> Any:
        left = [self.retry_policy.max_retries]  # the call's retries, shared by its parts
        return merge_responses(await self._gather_parts(
            [self._request(Call(path, dict(kwargs, n=k), left=left), source) for k in sizes]))

    # -- exact tokens and logprobs (the "Managed server" section) ------------------------------

    @contextlib.asynccontextmanager
    async def managed_server(self, tokenizer: Any = None, base_url: Optional[str] = None,
                             preserve_think_blocks: bool = False, track_tree: bool = False):
        """``async with manager.managed_server(tokenizer=tok) as managed:`` a ``ManagedServer``
        whose completions are recorded as nodes (``managed.get_state()["nodes"]``); reset on exit.

        ``server_type="openai"`` refuses, as in Atropos, unless ``ATROPOS_ALLOW_DUMMY_MANAGED_SERVER``
        is set (then placeholder tokens, not fit for training); ``"trl"`` refuses.
        """
        if base_url is not None:
            raise ConfigError(f"managed_server(base_url={base_url!r}): pinning a session to one server is not "
                              "supported; its calls are dispatched, capped and retried like chat_completion")
        types = {s.config.server_type for s in self.servers}
        if types == {"openai"} and os.environ.get(DUMMY_MANAGED_ENV, "").lower() in ("1", "true", "yes"):
            warnings.warn("managed_server with server_type='openai': placeholder token ids and logprobs, "
                          "NOT fit for training")
            managed: Any = DummyManagedServer(self, track_tree)
        else:
            for server_type in sorted(types):
                token_protocols(server_type)
            managed = ManagedServer(self, tokenizer, track_tree, preserve_think_blocks)
        try:
            yield managed
        finally:
            managed.reset()

    async def tokens_and_logprobs_completion(self, *, vocab: Optional[int] = None,
                                             **kwargs: Any) -> Tuple[list, list, list, list]:
        """Atropos' 4-tuple ``(prompt_tokens, output_tokens, output_logprobs, finish_reasons)``
        for ``input_ids=[...]`` (or ``prompt`` text the server tokenizes) and sampling parameters;
        one list per choice, in choice order, ``n`` split as for ``completion``.  Every id and
        logprob is checked (``TokenReader``): a malformed answer raises ``TokenProtocolError``.
        ``vocab``, the tokenizer's size (``len(tokenizer)``) when known, bounds the ids (not sent)."""
        token_prompt(kwargs)
        parts = await self._token_calls(kwargs, False, vocab)
        outputs, logprobs, reasons = [], [], []
        for i, (prompt_ids, part_outputs, part_logprobs, part_reasons) in enumerate(parts):
            if prompt_ids != parts[0][0]:  # a text prompt, split: each server tokenized it
                raise TokenProtocolError(
                    f"the parts of a split call (n={kwargs.get('n')}) got the prompt tokenized differently: "
                    f"part 0 as {len(parts[0][0])} ids, part {i} as {_shown(prompt_ids)} ({len(prompt_ids)}); "
                    f"servers with different tokenizers? Pass input_ids to fix the tokens")
            outputs += part_outputs
            logprobs += part_logprobs
            reasons += part_reasons
        return parts[0][0], outputs, logprobs, reasons

    async def get_logprobs(self, *, vocab: Optional[int] = None, **kwargs: Any) -> Dict[str, Any]:
        """Atropos' normalized prompt logprobs for ``input_ids`` or ``prompt``, ``top_k`` (or
        ``top_logprobs``, default 1) per position: ``{"prompt_tokens": [...],
        "prompt_topk_token_ids": [[...], ...], "prompt_topk_logprobs": [[...], ...]}``; ``vocab``
        as for ``tokens_and_logprobs_completion``."""
        token_prompt(kwargs)
        return (await self._token_calls(dict(kwargs, n=1), True, vocab))[0]

    async def _token_calls(self, kwargs: Dict[str, Any], prompt_logprobs: bool, vocab: Optional[int]) -> list:
        """The results of a token call's requests (one per part of ``n``), each read by its
        protocol (``TokenReader``) before its slot is given back."""
        self._enter()
        sizes = n_sizes(kwargs.get("n", 1), self._per_request, kwargs.get("stream"))
        left = [self.retry_policy.max_retries]
        calls = [TokenCall(kwargs if sizes is None else dict(kwargs, n=k), prompt_logprobs, self._endpoints_of,
                           vocab, left) for k in sizes or [None]]
        return await self._gather_parts([self._request(call, self.slot_source) for call in calls])

    def _endpoints_of(self, server: OpenAIServer) -> EndpointFallback:
        fallback = self._endpoints.get(server)
        if fallback is None:
            names = [p.name for p in token_protocols(server.config.server_type)]
            fallback = self._endpoints[server] = EndpointFallback(server.url, names)
        return fallback

    def stats(self) -> List[Dict[str, Any]]:
        """Per server: health, requests in flight, done, failed, retried, latency p50/p99 (s)."""
        rows = []
        for slot in self.slots.records:
            s = slot.server.stats
            lat = sorted(s.latencies)
            rows.append({
                "url": slot.server.url, "healthy": slot.healthy, "in_flight": sum(slot.in_flight.values()),
                "done": s.done, "failed": s.failed, "retried": s.retried,
                "p50": lat[len(lat) // 2] if lat else None,
                "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                "last_error": slot.last_error,
            })
        return rows

    # -- Atropos' members: weights and dedicated servers ----------------------------------------

    async def update_weight(self, weight: float) -> None:
        """Scale both caps of every server to ``ceil(cap * weight)`` (Atropos' environment weight,
        which ``BaseEnv.get_status`` sets on every status poll); calls waiting for a slot see the
        new caps at once.  ``weight=0`` holds new calls until a larger weight comes (each for at
        most the manager's slot wait); any weight above 0 leaves each cap at least 1."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(f"weight={weight!r} must be a number >= 0")
        caps = [(slot, weighted_cap(slot.server.config.num_max_requests_at_once, weight),
                 weighted_cap(slot.server.config.num_requests_for_eval, weight)) for slot in self.slots.records]
        for slot, train, eval_cap in caps:  # all computed first: a refused weight changes none
            self.slots.set_caps(slot, train, eval_cap)

    @contextlib.asynccontextmanager
    async def dedicated_server(self) -> AsyncIterator["DedicatedServer"]:
        """Hold one healthy server for a multi-turn episode (see ``DedicatedServer``).

        ``async with manager.dedicated_server() as server: await server.chat_completion(...)``
        """
        self._enter()
        episode = DedicatedServer(self, self.slot_source, await self.slot_source.acquire("train", None))
        try:
            yield episode
        finally:
            episode.end()

    async def close(self) -> None:
        """Stop the health probes and close every pooled connection.

        Calls still running finish, and their connections are closed as they do; new calls
        raise ``ManagerClosedError``.
        """
        self._closed = True
        probes = list(self._probes.values())
        self._probes.clear()
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for server in self.servers:
            server.close()

    async def __aenter__(self) -> "ServerManager":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- one call: checked, split in parts of n, each part through _request ---------------------

    def _enter(self) -> asyncio.AbstractEventLoop:
        """The running loop, for a new call: raises when the manager is closed, and restarts
        the probes of down servers in a new event loop (the last one's ended with it)."""
        if self._closed:
            raise ManagerClosedError("this ServerManager was closed; make a new one")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._probe_all_down()
            if self.server_load_interval and not self._closed:
                self._probes[-1] = asyncio.ensure_future(self._read_loads())
        return loop

    @staticmethod
    async def _gather_parts(parts: List[Awaitable[Any]]) -> list:
        """The parts' results in order, run concurrently; the first to fail cancels the others."""
        tasks = [asyncio.ensure_future(part) for part in parts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _request(self, call: Call, source: SlotSource) -> Any:
        """One request: choose a slot, call the server, obey the retry decision."""
        split, attempts, policy = call.split, None, self.retry_policy
        slot: Optional[ServerSlot] = None  # kept for a resend on a fresh connection
        avoid, fresh = None, False
        router = self.router if source is self.slot_source else None  # a dedicated server's episode: its own
        route = route_keys(call.kwargs) if router is not None else None
        policy.budget.deposit()
        while True:
            if slot is None and route:  # where the prompt's prefix is (see PrefixRouter)
                prefer, spill = router.choose(route, self.slots)
                slot = source.take(split, avoid or spill, prefer) or await source.acquire(split, avoid or spill)
                router.placed(route, slot)
            elif slot is None:  # the manager's free slot is taken at once, without the coroutine of a wait
                slot = source.take(split, avoid) or await source.acquire(split, avoid)
            started = time.monotonic()
            try:
                result = await call.send(slot.server, fresh, (lambda s=slot: source.give_back(s, split))
                                         if call.stream else None)
            except ServerError as error:
                attempts = attempts or policy.attempts(call.left)
                decision = attempts.failed(error)
                self._record_failure(slot, split, error, decision)
                if decision.action == Retry.RESEND and slot.healthy:
                    fresh = True  # in the same slot; a server marked down meanwhile is left instead
                    continue
                source.give_back(slot, split)
                if decision.action == Retry.RAISE:
                    raise attempts.gave_up(error)
                avoid, slot, fresh = slot, None, False
                await asyncio.sleep(decision.delay)
            except BaseException:
                source.give_back(slot, split)
                raise
            else:
                if not isinstance(result, EventStream):  # a stream gives its slot back when it ends
                    source.give_back(slot, split)
                    if route:
                        router.answered(route, slot, result)
                slot.server.stats.succeeded(split, time.monotonic() - started)
                return result

    def _record_failure(self, slot: ServerSlot, split: str, error: ServerError, decision: Retry) -> None:
        slot.server.stats.attempt_failed(split, decision.action != Retry.RAISE)
        self.slots.note_error(slot, str(error))
        log.debug("request to %s failed: %s: %s -> %s", slot.server.url, type(error).__name__, error, decision)
        if decision.mark_down:
            self._mark_down(slot)

    # -- health -------------------------------------------------------------------------------

    async def _read_loads(self) -> None:
        """Read each healthy server's own queue (``read_server_load``) every
        ``server_load_interval`` seconds, or slower: at most ``MAX_LOAD_READS_PER_SECOND`` reads
        a second over all servers, one at a time per server; the router's bound uses them."""
        slots, router = self.slots.records, self.router
        gap = max(self.server_load_interval / len(slots), 1 / MAX_LOAD_READS_PER_SECOND)
        paths = {slot.index: ["/metrics", "/get_load"] for slot in slots}
        reading: set = set()

        async def read(slot: ServerSlot) -> None:
            try:
                load = await read_server_load(slot.server.url, paths[slot.index], slot.server.config.health_timeout)
            except ServerError:
                load = None
            finally:
                reading.discard(slot)
            mine = slot.in_flight["train"] + slot.in_flight["eval"]
            router.report(slot, None if load is None else max(0, load - mine))

        tasks: set = set()
        for slot in itertools.cycle(slots):
            if slot.healthy and paths[slot.index] and slot not in reading:
                reading.add(slot)
                task = asyncio.ensure_future(read(slot))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif not slot.healthy and slot in router.reported:
                router.report(slot, None)
            try:
                await asyncio.sleep(gap)
            except asyncio.CancelledError:
                for task in list(tasks):
                    task.cancel()
                raise

    def _mark_down(self, slot: ServerSlot) -> None:
        if not slot.server.config.health_check or not slot.healthy:
            return
        log.warning("server %s marked down: %s", slot.server.url, slot.last_error)
        self.slots.set_healthy(slot, False)
        self._start_probe(slot)

    def _probe_all_down(self) -> None:
        for slot in self.slots.records:
            if not slot.healthy:
                self._start_probe(slot)

    def _start_probe(self, slot: ServerSlot) -> None:
        if self._closed:
            return
        if slot.index not in self._probes or self._probes[slot.index].done():
            self._probes[slot.index] = asyncio.ensure_future(self._probe_until_healthy(slot))

    async def _probe_until_healthy(self, slot: ServerSlot) -> None:
        """Probe a down server's health path until it answers 2xx (waits: ``probe_waits``), then
        bring it back.

        A server without the health path (404) counts as healthy when ``GET /v1/models`` is 200.
        """
        waits = probe_waits(self.health_probe_interval)
        while not slot.healthy and not self._closed:
            await asyncio.sleep(next(waits))
            if await slot.server.check_health():
                log.info("server %s is healthy again", slot.server.url)
                self.slots.set_healthy(slot, True)
            else:
                self.slots.note_error(slot, f"health probe: {slot.server.health_error}")


# =============================================================================================
# Managed server: exact tokens and logprobs
# =============================================================================================

DUMMY_MANAGED_ENV = "ATROPOS_ALLOW_DUMMY_MANAGED_SERVER"
MASKED_TOKEN = -100  # masked_tokens over the prompt: ignored by the loss
MASKED_LOGPROB = 1.0  # logprobs over the prompt: above 0, so never mistaken for a real one


def _max_tokens_named(params: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``params`` with ``max_tokens``/``max_new_tokens``/``max_completion_tokens`` called ``name``."""
    params = dict(params)
    for key in ("max_tokens", "max_new_tokens", "max_completion_tokens"):
        if key in params and key != name:
            params[name] = params.pop(key)
    return params


TOKEN_ID_BOUND = 2 ** 31  # token ids are below this when the tokenizer's size is unknown (every vocabulary is)
MAX_LOGPROB = 1e-4  # a log-probability is <= 0; this much above is float rounding


class _Count(int):
    """A length, shown as ``3 item(s)`` in a ``TokenReader`` error."""

    def __repr__(self) -> str:
        return f"{int(self)} item(s)"

    __str__ = __repr__


class TokenReader:
    """Reads one token-protocol answer, strictly, before anything of it is recorded or returned.

    Each read takes the JSON value and the field's name as it stands in the answer, and either
    gives the value (ids as ``int``, logprobs as ``float``) or raises ``TokenProtocolError``
    naming the server, the protocol, the field, what was expected and (cut short) what came.
    ``n`` is the number of choices the request asked for; ``vocab`` the tokenizer's size
    (``len(tokenizer)``) when known, else ids are only bounded by ``TOKEN_ID_BOUND``; ``prompt``
    the request's token ids (or its text, which the server tokenizes); ``top_k`` the logprobs
    asked per prompt position (prompt scoring).
    """

    def __init__(self, protocol: str, url: str, n: int = 1, vocab: Optional[int] = None, prompt: Any = None,
                 top_k: int = 0):
        self.protocol, self.url, self.n, self.prompt, self.top_k = protocol, url, n, prompt, top_k
        self.bound = vocab or TOKEN_ID_BOUND
        self.id_rule = (f"a token id: an integer >= 0 and < {vocab} (len(tokenizer))" if vocab
                        else "a token id: an integer >= 0 and < 2**31")

    def error(self, field: str, expected: str, got: Any) -> TokenProtocolError:
        shown = got if isinstance(got, _Count) else _shown(got)
        return TokenProtocolError(f"{self.protocol} answer: {field} must be {expected}, got {shown}", self.url)

    def get(self, obj: Any, key: str, field: str) -> Any:
        """``obj[key]``, present and not null; ``field`` is the name of ``obj``'s ``key`` in the answer."""
        if not isinstance(obj, dict):
            raise self.error(field.rpartition(".")[0] or "the answer", "a JSON object", obj)
        value = obj.get(key)
        if value is None:
            raise TokenProtocolError(f"{self.protocol} answer has no {field!r}: is server_type right for this "
                                     f"server? (answer: {_shown(obj)})", self.url)
        return value

    def items(self, value: Any, field: str, count: Optional[int] = None) -> list:
        """A JSON array (a string is not one), of ``count`` items when given."""
        if type(value) is not list:
            raise self.error(field, "a list" if count is None else f"a list of {count}", value)
        if count is not None and len(value) != count:
            raise self.error(field, f"a list of {count} item(s)", _Count(len(value)))
        return value

    def token_id(self, value: Any, field: str) -> int:
        if type(value) is not int or not 0 <= value < self.bound:  # type(): True is an int, not a token
            raise self.error(field, self.id_rule, value)
        return value

    def token_ids(self, value: Any, field: str, count: Optional[int] = None) -> List[int]:
        ids = self.items(value, field, count)
        for i, t in enumerate(ids):
            if type(t) is not int or not 0 <= t < self.bound:
                raise self.error(f"{field}[{i}]", self.id_rule, t)
        return ids

    def text_id(self, value: Any, prefix: str = "") -> int:
        """The token id written as ``prefix`` + ASCII digits (vLLM's ``"token_id:123"``, a JSON
        key ``"123"``; not ``" 7"``, ``"+7"``, ``"1_0"`` or ``"٣"``, which ``int`` takes), or -1."""
        if type(value) is str and value.startswith(prefix):
            digits = value[len(prefix):]
            if 0 < len(digits) < 20 and digits.isdigit() and digits.isascii():
                token = int(digits)
                if token < self.bound:
                    return token
        return -1

    def text_error(self, field: str, value: Any, prefix: str = "") -> TokenProtocolError:
        if not prefix:
            return self.error(field, f"{self.id_rule}, written in ASCII digits", value)
        ignored = not (isinstance(value, str) and value.startswith(prefix))  # "Hello": plain text tokens
        return self.error(field, f"'{prefix}' and {self.id_rule}" +
                          (" (did the server ignore return_tokens_as_token_ids?)" if ignored else ""), value)

    def token_texts(self, value: Any, field: str, prefix: str) -> List[int]:
        ids = []
        for i, text in enumerate(self.items(value, field)):
            token = self.text_id(text, prefix)
            if token < 0:
                raise self.text_error(f"{field}[{i}]", text, prefix)
            ids.append(token)
        return ids

    def logprob(self, value: Any, field: str) -> float:
        """A JSON number (not a boolean), finite, <= 0 up to rounding; vLLM's -9999.0 for minus
        infinity is the number it is."""
        kind = type(value)
        if kind is float:
            if -math.inf < value <= MAX_LOGPROB:
                return value
        elif kind is int and -10 ** 300 < value <= 0:
            return float(value)
        raise self.error(field, "a logprob: a finite number <= 0", value)

    def logprobs(self, value: Any, field: str, count: int) -> List[float]:
        values = self.items(value, field, count)
        for i, v in enumerate(values):
            if type(v) is not float or not -math.inf < v <= MAX_LOGPROB:  # else: the usual case, taken as it is
                return [self.logprob(v, f"{field}[{i}]") for i, v in enumerate(values)]
        return values

    def finish_reasons(self, values: Sequence[Any], fields: Sequence[str]) -> list:
        """Each a string or SGLang's ``{"type": "..."}``, as sent; an ``abort`` in either form
        raises ``GenerationAbortedError`` (retried like a 5xx).  A missing one is an error, not "stop"."""
        for value, field in zip(values, fields):
            kind = value.get("type") if isinstance(value, dict) else value
            if type(kind) is not str or not kind:
                raise self.error(field, "a finish reason: a string or {\"type\": a string}", value)
            if kind == "abort":
                raise GenerationAbortedError(f"the server aborted the generation ({field} is 'abort')", self.url)
        return list(values)

    def prompt_ids(self, reported: Any, field: str, required: bool) -> List[int]:
        """The prompt's ids: the request's own, which the server's report (if any) must equal, or,
        for a text prompt, the server's report (then ``required``)."""
        if reported is None:
            if isinstance(self.prompt, list):
                return self.prompt
            if required:
                raise TokenProtocolError(f"{self.protocol} answer has no {field!r}: the server did not report the "
                                         "prompt's token ids; pass input_ids", self.url)
            return []
        ids = self.token_ids(reported, field)
        if isinstance(self.prompt, list) and ids != self.prompt:
            raise self.error(field, f"the {len(self.prompt)} prompt ids sent", ids)
        if not ids:
            raise self.error(field, "the prompt's token ids (not empty)", ids)
        return ids

    def topk(self, entry: Any, field: str, first: bool, own: Optional[int] = None) -> Tuple[List[int], List[float]]:
        """One prompt position's (ids, logprobs), in the server's order, from ``{id: logprob}``,
        ``{id: {"logprob": x, ...}}`` (vLLM's OpenAI server), ``[{id: logprob}, ...]`` (Atropos'
        server) or ``[[logprob, id, text], ...]`` (SGLang).  The first position may be empty
        (``None``: nothing comes before it); every other holds at least ``top_k`` distinct ids,
        and ``own``, the prompt's token there, when given (vLLM adds it to the top k)."""
        ids: List[int] = []
        lps: List[float] = []
        if isinstance(entry, dict):
            entry = [entry]
        elif entry is not None and type(entry) is not list:
            raise self.error(field, "a prompt position's logprobs (an object or a list)", entry)
        for i, item in enumerate(entry or ()):
            if isinstance(item, dict):
                for key, value in item.items():
                    token = self.text_id(key)
                    if token < 0:
                        raise self.text_error(f"{field} key", key)
                    ids.append(token)
                    if isinstance(value, dict):
                        value = self.get(value, "logprob", f"{field}[{key!r}].logprob")
                    lps.append(self.logprob(value, f"{field}[{key!r}]"))
            elif type(item) is list and len(item) >= 2:
                ids.append(self.token_id(item[1], f"{field}[{i}][1]"))
                lps.append(self.logprob(item[0], f"{field}[{i}][0]"))
            else:
                raise self.error(f"{field}[{i}]", "{id: logprob} or [logprob, id, ...]", item)
        if len(set(ids)) != len(ids):
            raise self.error(field, "distinct token ids", ids)
        if not first and len(ids) < self.top_k:
            raise self.error(field, f"at least the {self.top_k} logprob(s) asked (top_k)", _Count(len(ids)))
        if not first and own is not None and own not in ids:
            raise self.error(field, f"the logprobs of a position that holds the prompt's token {own} there", ids)
        return ids, lps

    def prompt_topk(self, positions: Any, field: str, prompt_ids: List[int], own: bool) -> Dict[str, Any]:
        """Atropos' prompt-scoring dict: exactly one position per prompt token (each holding the
        prompt's own token, with ``own``)."""
        positions = self.items(positions, field, len(prompt_ids))
        topk = [self.topk(entry, f"{field}[{i}]", i == 0, prompt_ids[i] if own else None)
                for i, entry in enumerate(positions)]
        return {"prompt_tokens": prompt_ids, "prompt_topk_token_ids": [ids for ids, _ in topk],
                "prompt_topk_logprobs": [lps for _, lps in topk]}


class TokensProtocol:
    """How one kind of server takes a prompt of token ids and answers with token ids and logprobs.

    ``path`` is POSTed under ``base_url`` or, with ``root``, at the server's root.  Bodies are
    built from the caller's sampling parameters; answers are read by a ``TokenReader`` into
    Atropos' shapes: ``(prompt ids, output ids per choice, their logprobs, finish reasons)``
    for a completion, ``{"prompt_tokens", "prompt_topk_token_ids", "prompt_topk_logprobs"}``
    for prompt scoring.  A prompt is a list of token ids, or text that the server tokenizes
    (then it reports the ids).
    """

    name = path = ""
    root = False

    def completion_body(self, model: str, prompt: Any, params: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def completion_result(self, data: Any, read: TokenReader) -> Tuple[List[int], list, list, list]:
        raise NotImplementedError

    def logprobs_body(self, model: str, prompt: Any, top_k: int, params: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def logprobs_result(self, data: Any, read: TokenReader) -> Dict[str, Any]:
        raise NotImplementedError


class VLLMCompletionsTokens(TokensProtocol):
    """Any vLLM OpenAI server: a token-id prompt on ``/completions`` with ``logprobs`` and
    ``return_tokens_as_token_ids`` (tokens come back as ``"token_id:123"``), ``prompt_logprobs``
    for prompt scoring, ``return_token_ids`` for the ids of a text prompt.  Choices may come in
    any order: they are returned in ``index`` order."""

    name, path = "vLLM /v1/completions", "/completions"

    def completion_body(self, model, prompt, params):
        body = dict(_max_tokens_named(params, "max_tokens"), model=model, prompt=prompt,
                    return_tokens_as_token_ids=True)
        body.setdefault("logprobs", 0)
        if isinstance(prompt, str):
            body["return_token_ids"] = True
        return body

    def _choices(self, data, read):
        """The ``n`` choices, in ``index`` order (each index 0..n-1 once), and their names in the answer."""
        choices = read.items(read.get(data, "choices", "choices"), "choices", read.n)
        ordered: List[Any] = [None] * read.n
        for i, choice in enumerate(choices):
            index = read.get(choice, "index", f"choices[{i}].index")
            if type(index) is not int or not 0 <= index < read.n or ordered[index] is not None:
                raise read.error(f"choices[{i}].index", f"an index 0..{read.n - 1} not given before", index)
            ordered[index] = (choice, f"choices[{i}]")
        return ordered

    def completion_result(self, data, read):
        choices = self._choices(data, read)
        reasons = read.finish_reasons([read.get(c, "finish_reason", f"{name}.finish_reason") for c, name in choices],
                                      [f"{name}.finish_reason" for _, name in choices])
        outputs, logprobs = [], []
        for choice, name in choices:
            lp = read.get(choice, "logprobs", f"{name}.logprobs")
            tokens = read.items(read.get(lp, "tokens", f"{name}.logprobs.tokens"), f"{name}.logprobs.tokens")
            outputs.append(read.token_texts(tokens, f"{name}.logprobs.tokens", "token_id:"))
            logprobs.append(read.logprobs(read.get(lp, "token_logprobs", f"{name}.logprobs.token_logprobs"),
                                          f"{name}.logprobs.token_logprobs", len(tokens)))
        prompts = [read.prompt_ids(c.get("prompt_token_ids"), f"{name}.prompt_token_ids", True) for c, name in choices]
        for (_, name), ids in zip(choices[1:], prompts[1:]):
            if ids != prompts[0]:
                raise read.error(f"{name}.prompt_token_ids", "the ids of choice 0's prompt", ids)
        return prompts[0], outputs, logprobs, reasons

    def logprobs_body(self, model, prompt, top_k, params):
        body = dict(_max_tokens_named(params, "max_tokens"), model=model, prompt=prompt, prompt_logprobs=top_k,
                    n=1, temperature=0.0, top_p=1.0)
        body.setdefault("max_tokens", 1)
        if isinstance(prompt, str):
            body["return_token_ids"] = True
        return body

    def logprobs_result(self, data, read):
        (choice, name), = self._choices(data, read)
        prompt_ids = read.prompt_ids(choice.get("prompt_token_ids"), f"{name}.prompt_token_ids", True)
        return read.prompt_topk(read.get(choice, "prompt_logprobs", f"{name}.prompt_logprobs"),
                                f"{name}.prompt_logprobs", prompt_ids, own=True)


class AtroposGenerateTokens(TokensProtocol):
    """Atropos' own vLLM server (``example_trainer/vllm_api_server.py``): ``POST /generate`` with
    ``{"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, ...}``, answered with per-choice
    ``logprobs`` ``[[{id: logprob}], ...]`` (the sampled token first), ``token_ids`` (must agree)
    and ``finish_reasons``; the body Atropos' ``vllm`` sends."""

    name, path, root = "Atropos /generate", "/generate", True

    def _prompt(self, prompt):
        return prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}

    def completion_body(self, model, prompt, params):
        return dict({"prompt": self._prompt(prompt), "logprobs": 0}, **_max_tokens_named(params, "max_tokens"))

    def completion_result(self, data, read):
        reasons = read.items(read.get(data, "finish_reasons", "finish_reasons"), "finish_reasons", read.n)
        reasons = read.finish_reasons(reasons, [f"finish_reasons[{c}]" for c in range(read.n)])
        outputs, logprobs = [], []
        for c, positions in enumerate(read.items(read.get(data, "logprobs", "logprobs"), "logprobs", read.n)):
            ids, lps = [], []
            for j, position in enumerate(read.items(positions, f"logprobs[{c}]")):
                if (type(position) is list and len(position) == 1 and type(position[0]) is dict
                        and len(position[0]) == 1):
                    (key, value), = position[0].items()  # the usual position: the sampled token alone
                    token = read.text_id(key)
                    if token >= 0 and type(value) is float and -math.inf < value <= MAX_LOGPROB:
                        ids.append(token)
                        lps.append(value)
                        continue
                field = f"logprobs[{c}][{j}]"
                if type(position) is not list or not position or not isinstance(position[0], dict) or not position[0]:
                    raise read.error(field, "[{id: logprob, ...}] (the sampled token first)", position)
                top = read.topk(position, field, True)
                ids.append(top[0][0])
                lps.append(top[1][0])
            outputs.append(ids)
            logprobs.append(lps)
        if data.get("token_ids") is not None:  # the server's own list of the sampled ids
            for c, sampled in enumerate(read.items(data["token_ids"], "token_ids", read.n)):
                if read.token_ids(sampled, f"token_ids[{c}]") != outputs[c]:
                    raise read.error(f"token_ids[{c}]", f"the sampled ids of logprobs[{c}] {_shown(outputs[c])}",
                                     sampled)
        return read.prompt_ids(data.get("prompt_token_ids"), "prompt_token_ids", True), outputs, logprobs, reasons

    def logprobs_body(self, model, prompt, top_k, params):
        body = dict({"prompt": self._prompt(prompt), "prompt_logprobs": top_k}, **_max_tokens_named(params, "max_tokens"))
        if isinstance(prompt, str):
            body.setdefault("logprobs", 0)  # the server reports prompt_token_ids only then
        body.update(n=1, temperature=0.0, top_p=1.0)
        body.setdefault("max_tokens", 1)
        return body

    def logprobs_result(self, data, read):
        prompt_ids = read.prompt_ids(data.get("prompt_token_ids") if isinstance(data, dict) else None,
                                     "prompt_token_ids", True)
        positions = read.get(data, "prompt_logprobs", "prompt_logprobs")
        field = "prompt_logprobs"
        # [sequence][position] or [position]: the prompt's length tells (a one-token prompt reads alike)
        if (type(positions) is list and len(positions) == 1 and type(positions[0]) is list
                and (len(prompt_ids) != 1 or all(p is None or isinstance(p, dict) for p in positions[0]))):
            positions, field = positions[0], "prompt_logprobs[0]"
        return read.prompt_topk(positions, field, prompt_ids, own=True)


class SGLangGenerateTokens(TokensProtocol):
    """SGLang's native ``POST /generate``: ``input_ids``, ``sampling_params``, ``return_logprob``;
    answered (a list when ``n > 1``) with ``meta_info.output_token_logprobs`` ``[[logprob, id,
    text], ...]`` and ``meta_info.finish_reason`` ``{"type": ...}`` (a string in older releases);
    prompt scoring with ``logprob_start_len: 0`` and ``top_logprobs_num`` (``input_token_logprobs``,
    ``input_top_logprobs``)."""

    name, path, root = "SGLang /generate", "/generate", True

    def _body(self, prompt, params, **extra):
        body = {"text": prompt} if isinstance(prompt, str) else {"input_ids": prompt}
        body.update(sampling_params=_max_tokens_named(params, "max_new_tokens"), return_logprob=True,
                    return_text_in_logprobs=False, **extra)
        return body

    def completion_body(self, model, prompt, params):
        return self._body(prompt, params, **({"logprob_start_len": 0} if isinstance(prompt, str) else {}))

    def _results(self, data, read):
        """The ``n`` results (an object when ``n`` is 1, else a list) and their ``meta_info``."""
        results = data if type(data) is list else [data]
        read.items(results, "the answer's results", read.n)
        prefix = (lambda c: f"[{c}].meta_info") if type(data) is list else (lambda c: "meta_info")
        metas = [(read.get(r, "meta_info", prefix(c)), prefix(c)) for c, r in enumerate(results)]
        for meta, name in metas:
            if not isinstance(meta, dict):
                raise read.error(name, "a JSON object", meta)
        return metas

    def _pairs(self, meta, key, name, read, first_may_be_null=False):
        """``[[logprob, id, ...], ...]`` -> (ids, logprobs); position 0 of the prompt has no logprob."""
        ids, lps = [], []
        bound = read.bound
        for j, entry in enumerate(read.items(read.get(meta, key, f"{name}.{key}"), f"{name}.{key}")):
            if type(entry) is list and len(entry) >= 2:  # the usual entry, taken at once
                logprob, token = entry[0], entry[1]
                if (type(token) is int and 0 <= token < bound and type(logprob) is float
                        and -math.inf < logprob <= MAX_LOGPROB):
                    ids.append(token)
                    lps.append(logprob)
                    continue
            if type(entry) is not list or len(entry) < 2:
                raise read.error(f"{name}.{key}[{j}]", "[logprob, token id, text]", entry)
            ids.append(read.token_id(entry[1], f"{name}.{key}[{j}][1]"))
            null = first_may_be_null and j == 0 and entry[0] is None
            lps.append(None if null else read.logprob(entry[0], f"{name}.{key}[{j}][0]"))
        return ids, lps

    def _prompt_ids(self, meta, name, read, from_start=True):
        """The prompt's ids.  SGLang reports ``input_token_logprobs`` from the request's
        ``logprob_start_len``: the whole prompt when asked from 0 (``from_start``: text prompts,
        prompt scoring); else from its default, the last prompt id (none in newer releases),
        which must then end the ids sent."""
        field, sent = f"{name}.input_token_logprobs", read.prompt
        ids = (self._pairs(meta, "input_token_logprobs", name, read, True)[0]
               if meta.get("input_token_logprobs") is not None else None)
        if from_start or ids is None or not isinstance(sent, list):
            return read.prompt_ids(ids, field, True)
        if len(ids) > len(sent) or ids != sent[len(sent) - len(ids):]:
            raise read.error(field, f"the last of the {len(sent)} prompt ids sent", ids)
        return sent

    def completion_result(self, data, read):
        metas = self._results(data, read)
        reasons = read.finish_reasons([read.get(m, "finish_reason", f"{name}.finish_reason") for m, name in metas],
                                      [f"{name}.finish_reason" for _, name in metas])
        outputs, logprobs = [], []
        for meta, name in metas:
            ids, lps = self._pairs(meta, "output_token_logprobs", name, read)
            outputs.append(ids)
            logprobs.append(lps)
        prompt = self._prompt_ids(metas[0][0], metas[0][1], read, from_start=False)
        for meta, name in metas[1:]:  # every result's prompt, when it reports one, is result 0's
            ids = self._prompt_ids(meta, name, read, False) if meta.get("input_token_logprobs") is not None else prompt
            if ids != prompt:
                raise read.error(f"{name}.input_token_logprobs", "the ids of result 0's prompt", ids)
        return prompt, outputs, logprobs, reasons

    def logprobs_body(self, model, prompt, top_k, params):
        params = dict(_max_tokens_named(params, "max_new_tokens"), n=1, temperature=0.0, top_p=1.0)
        params.setdefault("max_new_tokens", 1)
        return self._body(prompt, params, logprob_start_len=0, top_logprobs_num=top_k)

    def logprobs_result(self, data, read):
        (meta, name), = self._results(data, read)
        prompt_ids = self._prompt_ids(meta, name, read)
        return read.prompt_topk(read.get(meta, "input_top_logprobs", f"{name}.input_top_logprobs"),
                                f"{name}.input_top_logprobs", prompt_ids, own=False)


# Per server_type, the protocols tried in order: the next one after a 404 on a server (said once).
# "vllm" is Atropos' own /generate first (what Atropos' vllm type sends), then any vLLM's
# OpenAI server; "openai" and "trl" give no token ids (Atropos raised NotImplementedError too).
TOKEN_PROTOCOLS: Dict[str, Tuple[TokensProtocol, ...]] = {
    "vllm": (AtroposGenerateTokens(), VLLMCompletionsTokens()),
    "sglang": (SGLangGenerateTokens(),),
}


def token_protocols(server_type: str) -> Tuple[TokensProtocol, ...]:
    protocols = TOKEN_PROTOCOLS.get(server_type)
    if not protocols:
        raise ManagedServerUnsupportedError(
            f"server_type={server_type!r} gives no token ids or logprobs; use server_type 'vllm' or 'sglang' "
            f"(for 'openai', {DUMMY_MANAGED_ENV}=1 allows managed_server with placeholder tokens)")
    return protocols


def token_prompt(kwargs: Dict[str, Any]) -> Any:
    """The prompt of a token call: ``input_ids`` (a list of ints) or ``prompt`` text, checked."""
    if kwargs.get("input_ids") is not None:
        ids = kwargs["input_ids"]
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ConfigError(f"input_ids must be a non-empty list of token ids, got {str(ids)[:80]}")
        return list(ids)
    if not isinstance(kwargs.get("prompt"), str):
        raise ConfigError(f"give input_ids=[...] or prompt='...', got prompt={kwargs.get('prompt')!r}")
    return kwargs["prompt"]


def sampling_params(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The caller's sampling parameters of a token call: everything but the prompt and ours."""
    if kwargs.get("stream"):
        raise ConfigError("stream=True is not supported for token ids and logprobs")
    extra = extra_body_of(kwargs)
    params = {k: v for k, v in kwargs.items() if k not in _NOT_SENT and k not in ("model", "prompt", "input_ids")}
    params.update(extra or {})
    return params


@dataclasses.dataclass
class SequenceNode:
    """One tracked sequence, as Atropos' ``SequenceNode``: prompt + completion, aligned.

    ``tokens`` are every id; ``masked_tokens`` the same with ``MASKED_TOKEN`` (-100) over the
    prompt; ``logprobs`` the server's over the completion and ``MASKED_LOGPROB`` (1.0) over the
    prompt; ``metadata`` holds ``finish_reason``.
    """

    full_text: str
    tokens: List[int]
    masked_tokens: List[int]
    logprobs: List[float]
    metadata: Optional[Dict[str, Any]] = None

    def model_dump(self) -> Dict[str, Any]:
        """Plain data, as pydantic's ``model_dump()``."""
        return dataclasses.asdict(self)


def _finish_reason(raw: Any) -> str:
    """A finish reason as a string: SGLang's ``{"type": ...}`` read (``TokenReader`` checked it)."""
    return raw["type"] if isinstance(raw, dict) else raw


def tokenizer_size(tokenizer: Any) -> Optional[int]:
    """``len(tokenizer)`` (every id is below it), or None when the tokenizer does not tell."""
    try:
        size = len(tokenizer)
    except TypeError:
        return None
    return size if size > 0 else None


def _openai_response(kind: str, model: str, choices: List[Dict[str, Any]]) -> APIResponse:
    """A ChatCompletion/Completion as Atropos' managed server builds it (no usage; ``raw`` empty:
    the server's own answer had another shape)."""
    import uuid  # lazily: see _LazyModule
    response = APIResponse(id=str(uuid.uuid4()), created=int(time.time()), model=model,
                           object="chat.completion" if kind == "chat" else "text_completion",
                           choices=[AttrDict(c) for c in choices], service_tier=None, system_fingerprint=None,
                           usage=None)
    response.raw = b""
    return response


def _chat_choice(index: int, text: str, finish_reason: Any) -> Dict[str, Any]:
    message = AttrDict(content=text, role="assistant", refusal=None, annotations=None, audio=None,
                       function_call=None, tool_calls=None)
    return dict(finish_reason=finish_reason, index=index, logprobs=None, message=message)


class RecordedSequences:
    """What a managed session recorded, as Atropos keeps it: a list of nodes (default mode), or
    every sequence keyed by ``full_text`` (``track_tree=True``).  Shared by ``ManagedServer`` and
    the placeholder ``DummyManagedServer``."""

    def __init__(self, track_tree: bool = False):
        self.track_tree = track_tree
        self.sequences: Dict[str, SequenceNode] = {}  # tree mode
        self.current_nodes: List[SequenceNode] = []  # default mode

    def get_state(self) -> Dict[str, Any]:
        """``{"nodes": [...]}``, or in tree mode ``{"sequences": {...}, "tree": {...}}`` (copies)."""
        if self.track_tree:
            return {"sequences": dict(self.sequences), "tree": dict(self.sequences)}
        return {"nodes": list(self.current_nodes)}

    def reset(self) -> None:
        self.sequences.clear()
        self.current_nodes.clear()


class ManagedServer(RecordedSequences):
    """Atropos' ``ManagedServer`` over our ``ServerManager``: every completion is recorded as a
    ``SequenceNode`` with the exact token ids and logprobs the server generated.

    Prompts are token ids computed here with the environment's ``tokenizer`` (duck-typed:
    ``apply_chat_template``, ``encode``, ``decode``, ``bos_token_id``), a doubled BOS dropped;
    completions' ids and logprobs come from the server, never from re-tokenizing text.  Default
    mode keeps a list and replaces the node whose ``full_text`` a new prompt extends (its tokens
    are reused, its completions stay unmasked); ``track_tree=True`` keeps every sequence keyed
    by ``full_text`` (a prompt equal to a node's text reuses that node's tokens).  Each call is
    dispatched, capped and retried like ``chat_completion``.
    """

    _THINK = (("<think>", "__MNGD_THINK__"), ("</think>", "__MNGD_ENDTHINK__"))

    def __init__(self, manager: "ServerManager", tokenizer: Any, track_tree: bool = False,
                 preserve_think_blocks: bool = False):
        if tokenizer is None or not all(callable(getattr(tokenizer, m, None)) for m in ("encode", "decode")):
            raise ConfigError("managed_server needs tokenizer=, the environment's tokenizer (with encode and decode): "
                              "atropos_slurm loads none itself")
        super().__init__(track_tree)
        self.manager, self.tokenizer = manager, tokenizer
        self.preserve_think_blocks = preserve_think_blocks

    async def chat_completion(self, **kwargs: Any) -> APIResponse:
        """Chat through the tokenizer's chat template; Atropos' ChatCompletion.  ``tools`` are
        ignored, as Atropos does without a ``tool_parser``; with one, Atropos parses tool calls
        out of the raw text with vLLM's parsers, which this module does not have: refused."""
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        kwargs.pop("tool_choice", None)
        if tools and getattr(self.manager, "tool_parser", None):
            raise ManagedServerUnsupportedError(
                f"tools= with tool_parser={self.manager.tool_parser!r}: parsing tool calls out of the generated "
                "text needs vLLM's tool parsers, which atropos_slurm does not have")
        prompt = self.chat_prompt(kwargs.pop("messages", []))
        return await self._complete("chat", prompt, kwargs)

    async def completion(self, **kwargs: Any) -> APIResponse:
        kwargs = dict(kwargs)
        prompt = kwargs.pop("prompt", "")
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be text, got {type(prompt).__name__}")
        return await self._complete("completion", prompt, kwargs)

    async def get_logprobs(self, **kwargs: Any) -> Dict[str, Any]:
        """The manager's ``get_logprobs``; ``messages`` become a prompt through the chat template,
        and a prompt becomes ids with the tokenizer (a doubled BOS dropped), as for completions."""
        kwargs = dict(kwargs)
        if kwargs.get("messages") is not None:
            kwargs["prompt"] = self.chat_prompt(kwargs.pop("messages"))
        if kwargs.get("input_ids") is None and isinstance(kwargs.get("prompt"), str):
            kwargs["input_ids"] = self._prompt_ids(kwargs.pop("prompt"), None)
        return await self.manager.get_logprobs(vocab=tokenizer_size(self.tokenizer), **kwargs)

    def chat_prompt(self, messages: List[Dict[str, Any]]) -> str:
        """``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` unless the
        last message is the assistant's; ``<think>`` blocks of earlier turns kept, as Atropos does."""
        if not callable(getattr(self.tokenizer, "apply_chat_template", None)):
            return "\n".join(f"{m['role']}: {m.get('content', '')}" for m in messages)
        if not self.preserve_think_blocks:
            messages = [self._think(m, 0, 1) for m in messages]
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not messages or messages[-1].get("role") != "assistant")
        for tag, placeholder in self._THINK:
            prompt = prompt.replace(placeholder, tag)
        return prompt

    def _think(self, message: Dict[str, Any], old: int, new: int) -> Dict[str, Any]:
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, str) or "<think>" not in content:
            return message
        for pair in self._THINK:
            content = content.replace(pair[old], pair[new])
        return dict(message, content=content)

    def _prompt_ids(self, prompt: str, base: Optional[SequenceNode]) -> List[int]:
        """The prompt's ids: ``base``'s tokens plus the new text's, or the whole text encoded."""
        if base is None:
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        elif len(prompt) > len(base.full_text):
            ids = base.tokens + list(self.tokenizer.encode(prompt[len(base.full_text):], add_special_tokens=False))
        else:
            ids = list(base.tokens)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if len(ids) >= 2 and bos is not None and ids[0] == ids[1] == bos:
            ids = ids[1:]  # a chat template that writes BOS, encoded with special tokens
        return ids

    async def _complete(self, kind: str, prompt: str, kwargs: Dict[str, Any]) -> APIResponse:
        if self.track_tree:
            parent, extending = self.sequences.get(prompt), None
            base = parent
        else:
            parent = None
            extending = base = next((n for n in self.current_nodes if prompt.startswith(n.full_text)), None)
        prompt_ids = self._prompt_ids(prompt, base)
        _, outputs, logprobs, reasons = await self.manager.tokens_and_logprobs_completion(
            vocab=tokenizer_size(self.tokenizer), **dict(kwargs, input_ids=prompt_ids))
        choices = []
        for i, (output, output_logprobs, raw_reason) in enumerate(zip(outputs, logprobs, reasons)):
            reason = _finish_reason(raw_reason)
            text = self.tokenizer.decode(output, skip_special_tokens=True)
            self._record(self._node(prompt, prompt_ids, output, output_logprobs, text, reason, extending), extending)
            choices.append(_chat_choice(i, text, reason) if kind == "chat"
                           else dict(finish_reason=reason, index=i, logprobs=None, text=text))
        return _openai_response(kind, self.manager.configs[0].model_name, choices)

    def _node(self, prompt: str, prompt_ids: List[int], output: List[int], output_logprobs: List[float],
              text: str, reason: Any, extending: Optional[SequenceNode]) -> SequenceNode:
        if extending is not None:  # earlier completions stay unmasked; the new text is prompt
            new = len(prompt_ids) - len(extending.tokens)
            masked = extending.masked_tokens + [MASKED_TOKEN] * new + output
            logprobs = extending.logprobs + [MASKED_LOGPROB] * new + output_logprobs
        else:
            masked = [MASKED_TOKEN] * len(prompt_ids) + output
            logprobs = [MASKED_LOGPROB] * len(prompt_ids) + output_logprobs
        return SequenceNode(full_text=prompt + text, tokens=prompt_ids + output, masked_tokens=masked,
                            logprobs=logprobs, metadata={"finish_reason": reason})

    def _record(self, node: SequenceNode, extending: Optional[SequenceNode]) -> None:
        """Tree: keyed by text.  Default: the first node of a call replaces the one it extends,
        the others are appended (as Atropos does)."""
        if self.track_tree:
            self.sequences[node.full_text] = node
            return
        for i, current in enumerate(self.current_nodes):
            if current is extending:
                self.current_nodes[i] = node
                return
        self.current_nodes.append(node)


class DummyManagedServer(RecordedSequences):
    """What Atropos gives ``server_type="openai"`` when ``ATROPOS_ALLOW_DUMMY_MANAGED_SERVER`` is
    set: plain completions, recorded with placeholder tokens (ids 0..127, logprobs -0.5) and
    ``metadata["dummy_tokens"]``.  For evaluation only: nothing here is fit for training."""

    DUMMY_TOKENS = list(range(128))
    DUMMY_MASKED_TOKENS = [MASKED_TOKEN] + DUMMY_TOKENS[1:]
    DUMMY_LOGPROBS = [-0.5] * 128

    def __init__(self, manager: "ServerManager", track_tree: bool = False):
        super().__init__(track_tree)
        self.manager = manager

    def _record(self, full_text: str, finish_reason: Any) -> None:
        node = SequenceNode(full_text=full_text, tokens=list(self.DUMMY_TOKENS),
                            masked_tokens=list(self.DUMMY_MASKED_TOKENS), logprobs=list(self.DUMMY_LOGPROBS),
                            metadata={"finish_reason": finish_reason or "stop", "dummy_tokens": True})
        if self.track_tree:
            self.sequences[full_text] = node
        else:
            self.current_nodes.append(node)

    async def chat_completion(self, **kwargs: Any) -> Any:
        response = await self.manager.chat_completion(**kwargs)
        for choice in response.choices:
            turns = list(kwargs.get("messages", [])) + [{"role": "assistant", "content": choice.message.content or ""}]
            self._record("\n\n".join(f"{m['role']}:{m['content']}" for m in turns), choice.get("finish_reason"))
        return response

    async def completion(self, **kwargs: Any) -> Any:
        response = await self.manager.completion(**kwargs)
        for choice in response.choices:
            self._record(f"{kwargs.get('prompt', '')}{choice.get('text') or ''}", choice.get("finish_reason"))
        return response

    async def get_logprobs(self, **kwargs: Any) -> Dict[str, Any]:
        raise ManagedServerUnsupportedError("the placeholder managed server of server_type='openai' has no logprobs")


# =============================================================================================
# Atropos compatibility: atroposlib's BaseEnv and environments on this ServerManager
# =============================================================================================

# Atropos' server classes and the server_type each stands for (its abstract APIServer: none,
# the configs' server_type decides).
ATROPOS_SERVER_TYPES = {"APIServer": None, "OpenAIServer": "openai", "VLLMServer": "vllm",
                        "SGLangServer": "sglang", "TrlVllmServer": "trl"}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def own_config(config: Any) -> Any:
    """Atropos' pydantic ``ServerBaseline``/``APIServerConfig`` (any object with their
    attributes) as ours, read field by field; fields we do not know are ignored, as pydantic
    ignores unknown ones.  A config without a ``base_url`` is a baseline.  Ours, and things
    that are no config at all, are returned as they are (``ServerManager`` rejects the latter).
    """
    if isinstance(config, ServerBaseline) or not hasattr(config, "model_name"):
        return config
    cls = APIServerConfig if getattr(config, "base_url", None) else ServerBaseline
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
                  if getattr(config, f.name, None) is not None})


def atropos_server_type(server_class: Any) -> Tuple[bool, Optional[str]]:
    """(whether ``server_class`` is one of Atropos' server classes, the server_type it stands for).

    A class of one's own derived from Atropos' is refused: its overrides could not run here.
    """
    atropos = [c for c in getattr(server_class, "__mro__", ()) if c.__module__.startswith("atroposlib.")]
    if not atropos:
        return False, None
    name = server_class.__name__
    if atropos[0] is not server_class or name not in ATROPOS_SERVER_TYPES:
        raise ConfigError(f"server_class={server_class.__module__}.{name} is not one of Atropos' "
                          f"{', '.join(ATROPOS_SERVER_TYPES)}: its code cannot run on atropos_slurm's ServerManager")
    return True, ATROPOS_SERVER_TYPES[name]


def resolve_servers(configs: Any, server_class: Any, slurm: bool, testing: bool, reasoning_config: Any,
                    proxy_url: Optional[str], use_proxy: bool) -> Tuple[List[APIServerConfig], Any]:
    """``ServerManager``'s arguments, as Atropos' ``BaseEnv`` passes them, resolved: (one
    ``APIServerConfig`` per server, the server factory).  The job is discovered at most once.

    Atropos' pydantic configs are read by field; Atropos' server classes become ours, a
    concrete one setting every config's ``server_type``; ``reasoning_config`` is given to each
    server; ``testing=True`` points one server at this process' stub server (``testing_stub_url``).
    Atropos' discovery rules: a lone baseline (no ``base_url``) discovers whenever
    ``SLURM_JOB_NODELIST`` is set, and a nodelist of one node discovers nothing (a lone
    baseline then means localhost:9004-9007, a list is used as given), unless
    ``NUM_TRAINING_NODES=0`` says that node serves.  Discovery is ``discover_servers()``, the
    first config the template of every server.
    """
    proxy_url = proxy_url or os.environ.get("ATROPOS_PROXY_URL")
    if proxy_url or use_proxy:
        raise ConfigError(f"proxy_url={proxy_url!r} (or ATROPOS_PROXY_URL), use_proxy={use_proxy!r}: Atropos' "
                          "ManagedServer proxy is not supported")
    lone = not isinstance(configs, (list, tuple))
    configs = [own_config(c) for c in ([configs] if lone else configs)]
    if not configs or not all(isinstance(c, ServerBaseline) for c in configs):
        raise ConfigError("configs must be a ServerBaseline or a non-empty list of APIServerConfig")
    is_atropos, server_type = atropos_server_type(server_class)
    if is_atropos:
        server_class = OpenAIServer
        if server_type is not None:
            configs = [dataclasses.replace(c, server_type=server_type) for c in configs]
    if reasoning_config is not None:
        server_class = functools.partial(server_class, reasoning_config=reasoning_config)
    if testing:
        return configs_for_urls(configs[0], [testing_stub_url()]), server_class
    if atropos_discovers(slurm, lone and not getattr(configs[0], "base_url", "")):
        discovery = discover_servers()
        log.info("discovered %d inference servers on %s", len(discovery.servers), ",".join(discovery.inference_nodes))
        return configs_for_urls(configs[0], discovery.urls), server_class
    if not isinstance(configs[0], APIServerConfig):
        return configs_for_urls(configs[0], LOCAL_DEFAULT_URLS), server_class
    return configs, server_class


def atropos_discovers(slurm: bool, lone_baseline: bool) -> bool:
    """Whether to discover, as Atropos: with ``slurm=True``, or for a lone baseline when
    ``SLURM_JOB_NODELIST`` is set; but not on a one-node job unless ``NUM_TRAINING_NODES=0``
    (a heterogeneous job or a server list is never "one node").

    The nodes are counted by the hostlist grammar, without ``scontrol`` (discovery runs it,
    once).  ``slurm=True`` outside a job discovers, and discovery says what is missing.
    """
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if nodelist is None or not (slurm or lone_baseline):
        return slurm
    # Not about a heterogeneous job (its SLURM_JOB_NODELIST is component 0's alone) or a server list.
    one_nodelist = "SLURM_HET_SIZE" not in os.environ and not os.environ.get(ENV_SERVERS, "").strip()
    if not nodelist or not one_nodelist or os.environ.get("NUM_TRAINING_NODES", "").strip() == "0":
        return True
    try:
        one_node = len(expand_hostlist(nodelist)) < 2
    except HostlistError:  # discovery says what is wrong with it
        return True
    if one_node:
        log.info("SLURM_JOB_NODELIST=%r is one node (and NUM_TRAINING_NODES is not 0): no discovery, "
                 "as in Atropos", nodelist)
    return not one_node


_testing_stub_lock = threading.Lock()
_testing_stub_urls: List[str] = []


def testing_stub_url() -> str:
    """The URL of this process' stub server, for ``ServerManager(testing=True)``.

    Atropos' ``testing=True`` swaps in a harness of canned responses (which its own manager's
    calls then crash on); here the manager is the real one, talking to a ``StubServer`` on
    127.0.0.1 that runs in a daemon thread with its own event loop, started on first use and
    shared by every testing manager of the process.
    """
    with _testing_stub_lock:
        if not _testing_stub_urls:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="atropos-slurm-testing-stub", daemon=True).start()
            stub = asyncio.run_coroutine_threadsafe(StubServer(model="testing").start(), loop).result(30)
            _testing_stub_urls.append(f"http://127.0.0.1:{stub.port}/v1")
        return _testing_stub_urls[0]


def reasoning_extra_body(reasoning_config: Any, base_url: str) -> Optional[Dict[str, Any]]:
    """What Atropos merges into a chat request's ``extra_body`` for its ``ReasoningConfig``
    (read by field: ``enabled``, ``effort``, ``max_tokens``), or None for nothing.

    OpenAI's own API gets ``reasoning_effort`` (default "medium"); every other server
    ``reasoning: {enabled, effort | max_tokens}`` (OpenRouter's shape; effort wins).
    """
    if reasoning_config is None:
        return None
    effort = getattr(reasoning_config, "effort", None)
    max_tokens = getattr(reasoning_config, "max_tokens", None)
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ConfigError(f"reasoning effort={effort!r} is not one of {', '.join(REASONING_EFFORTS)}")
    if not (getattr(reasoning_config, "enabled", False) or effort is not None or max_tokens is not None):
        return None
    if "api.openai.com" in base_url:
        return {"reasoning_effort": effort or "medium"}
    reasoning: Dict[str, Any] = {"enabled": True}
    if effort is not None:
        reasoning["effort"] = effort
    elif max_tokens is not None:
        reasoning["max_tokens"] = max_tokens
    return {"reasoning": reasoning}


def weighted_cap(cap: int, weight: float) -> int:
    """``ceil(cap * weight)``, as Atropos' weighted semaphores admit (rounding error ignored:
    10 x 0.3 is 3, not 4), and at least 1 for any ``weight > 0`` (a cap of 0 would hold every
    call until its slot wait ends); a product too large for a float is a ``ConfigError``."""
    scaled = cap * weight
    if not math.isfinite(scaled):
        raise ConfigError(f"weight={weight!r} scales the cap {cap} to {scaled}: give a smaller weight")
    return max(math.ceil(round(scaled, 9)), 1 if weight > 0 and cap > 0 else 0)


class DedicatedServer(SlotSource):
    """One server held for a multi-turn episode, from ``ServerManager.dedicated_server()``.

    The episode holds one "train" slot of one healthy server from start to end, as Atropos'
    does; its calls (``chat_completion``, ``completion``, with ``split`` and ``n`` as the
    manager's) run in that slot one at a time, so the server's caps still hold, and are retried
    as any call.  When its server goes down, the episode moves to another healthy one.  A
    stream keeps the slot until it ends: the episode's next call waits for it (at most the
    manager's slot wait), and a stream still open when the episode ends holds the server's slot
    until it ends.  Calls after the episode ended raise ``ConfigError``.  It is the episode's
    calls' ``SlotSource``, over the manager's (``shared``).
    """

    def __init__(self, manager: "ServerManager", shared: "SharedSlots", slot: ServerSlot):
        self._manager, self._shared, self._slot = manager, shared, slot
        self._turn = asyncio.Semaphore(1)
        self._ended = False

    @property
    def server(self) -> Optional[OpenAIServer]:
        return self._slot.server if self._slot is not None else None

    @property
    def config(self) -> APIServerConfig:
        return self.server.config

    @property
    def server_healthy(self) -> bool:
        return self._slot is not None and self._slot.healthy

    async def chat_completion(self, **kwargs: Any) -> Any:
        return await self._manager.dispatch("/chat/completions", kwargs, self)

    async def completion(self, **kwargs: Any) -> Any:
        return await self._manager.dispatch("/completions", kwargs, self)

    # The SlotSource of the episode's calls.

    async def acquire(self, split: str, avoid: Optional[ServerSlot]) -> ServerSlot:
        wait = self._shared.slot_timeout
        with _Deadline(wait, f"the episode's slot was still in use after timeout={wait:g} s "
                             "(by an unfinished stream of this episode?)"):
            await self._turn.acquire()
        try:
            if self._ended:
                raise ConfigError("this dedicated_server() episode has ended: make its calls inside its "
                                  "`async with` block")
            if self._slot is None or not self._slot.healthy:  # down (or a move failed): move
                old, self._slot = self._slot, None
                if old is not None:
                    self._shared.give_back(old, "train")
                self._slot = await self._shared.acquire("train", old)
            return self._slot
        except BaseException:
            self._turn.release()
            raise

    def give_back(self, slot: ServerSlot, split: str) -> None:
        self._turn.release()
        if self._ended:  # the stream that outlived its episode ended
            self._leave_server()

    def end(self) -> None:
        self._ended = True
        if not self._turn.locked():  # else a stream still runs in the slot: it ends the episode
            self._leave_server()

    def _leave_server(self) -> None:
        if self._slot is not None:
            self._shared.give_back(self._slot, "train")
            self._slot = None


# Where atroposlib keeps the ServerManager that BaseEnv (and code importing it later) builds.
ATROPOS_MANAGER_MODULES = ("atroposlib.envs.server_handling.server_manager", "atroposlib.envs.base")


def patch_atropos() -> None:
    """Make atroposlib build this module's ``ServerManager``: every ``BaseEnv`` created after
    this call, and code that imports ``ServerManager`` from atroposlib afterwards, gets ours.

    Idempotent.  atroposlib is imported here only.  Its pydantic ``ServerBaseline`` and
    ``APIServerConfig`` stay as they are (BaseEnv's command line is built from their pydantic
    fields); ours reads them by field.
    """
    import importlib

    try:
        modules = [importlib.import_module(name) for name in ATROPOS_MANAGER_MODULES]
    except ImportError as e:
        raise ConfigError(f"cannot import atroposlib ({e}); pip install atroposlib") from None
    original = getattr(modules[0], "ServerManager")
    for module in modules + [m for name, m in list(sys.modules.items()) if name.startswith("atroposlib.")]:
        if getattr(module, "ServerManager", None) in (original, ServerManager):
            module.ServerManager = ServerManager


def run_env(script: str, argv: Sequence[str]) -> None:
    """Run an Atropos environment script as ``python script ARGS`` would, on our manager."""
    if not os.path.isfile(script):
        raise ConfigError(f"environment script {script!r} is not a file")
    patch_atropos()
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import runpy  # lazily: see _LazyModule
    runpy.run_path(script, run_name="__main__")


# =============================================================================================
# Stub server: a small OpenAI-compatible server for smoke tests, the demo and the benchmarks
# =============================================================================================

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.([01])\Z")


_LIST_PROMPT = re.compile(rb'"prompt"\s*:\s*\[\s*[0-9]')  # a /v1/completions prompt of token ids


class StubTokens:
    """The stub server's token protocols: made-up but deterministic ids and logprobs.

    A text prompt is "tokenized" as its UTF-8 bytes.  Choice ``c`` of a request generates
    ``max_tokens`` (16) ids cycling through the prompt's own ids from its ``c``-th (so every id is one the
    caller's tokenizer knows), each with logprob ``-((id + 3c + j) % 50 + 1) / 10``, and stops
    with "length".  Prompt scoring gives each position after the first the prompt's own id and
    then the smallest other ids, ``k`` in all.  Shapes: vLLM's ``/v1/completions`` with
    ``return_tokens_as_token_ids`` (``prompt_logprobs``, ``return_token_ids``), Atropos'
    ``/generate`` (``example_trainer/vllm_api_server.py``, plus ``prompt_logprobs`` when asked)
    and SGLang's ``/generate`` (``sampling_params``, ``return_logprob``, ``logprob_start_len``,
    ``top_logprobs_num``).
    """

    @staticmethod
    def asked(body: bytes) -> bool:
        """Whether a ``/v1/completions`` body asks for token ids (else the plain stub answer)."""
        return b"return_tokens_as_token_ids" in body or b"prompt_logprobs" in body or bool(_LIST_PROMPT.search(body))

    @staticmethod
    def logprob(token: int, choice: int, j: int) -> float:
        return -((token + 3 * choice + j) % 50 + 1) / 10

    @classmethod
    def outputs(cls, prompt: List[int], n: int, count: int) -> List[List[Tuple[int, float]]]:
        return [[(prompt[(c + j) % len(prompt)], cls.logprob(prompt[(c + j) % len(prompt)], c, j))
                 for j in range(count)] for c in range(n)]

    @classmethod
    def topk(cls, prompt: List[int], k: int) -> List[Optional[List[Tuple[int, float]]]]:
        """Per prompt position: None at 0, then the prompt's own id and the smallest others, ``k`` in all."""
        positions: List[Optional[List[Tuple[int, float]]]] = [None]
        for i, own in enumerate(prompt[1:], 1):
            ids = [own] + [t for t in range(k) if t != own][:k - 1]
            positions.append([(t, cls.logprob(t, 0, i)) for t in ids])
        return positions

    @staticmethod
    def prompt_ids(prompt: Any) -> List[int]:
        if isinstance(prompt, str):
            return list(prompt.encode("utf-8")) or [0]
        if (isinstance(prompt, list) and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
            return prompt
        raise ValueError("the prompt must be text or a non-empty list of token ids")

    @staticmethod
    def counts(params: Dict[str, Any], name: str) -> Tuple[int, int]:
        n, count = params.get("n", 1), params.get(name, 16)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n, count)):
            raise ValueError(f"n and {name} must be positive integers")
        return n, count

    @staticmethod
    def top(request: Dict[str, Any], name: str) -> Optional[int]:
        """``request[name]``, a number of logprobs per position: None, or 0..20 (vLLM's default cap)."""
        value = request.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
            raise ValueError(f"{name} must be an integer from 0 to 20")
        return value

    @classmethod
    def answer(cls, path: str, body: bytes) -> Tuple[int, Any]:
        """(status, JSON payload) for a token request: 400 naming what is wrong in a bad one."""
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object")
            if path == "/v1/completions":
                return 200, cls.vllm(request)
            if "sampling_params" in request or "input_ids" in request:
                return 200, cls.sglang(request)
            return 200, cls.atropos(request)
        except (ValueError, TypeError, KeyError) as e:
            return 400, {"error": {"message": f"invalid request: {e}", "code": 400}}

    @classmethod
    def vllm(cls, request: Dict[str, Any]) -> Dict[str, Any]:
        prompt = cls.prompt_ids(request.get("prompt"))
        n, count = cls.counts(request, "max_tokens")
        k, top = cls.top(request, "prompt_logprobs"), cls.top(request, "logprobs")
        choices = []
        for c, generated in enumerate(cls.outputs(prompt, n, count)):
            logprobs = None if top is None else {  # top_logprobs: the sampled id, then the smallest others
                "tokens": [f"token_id:{t}" for t, _ in generated], "token_logprobs": [lp for _, lp in generated],
                "top_logprobs": [dict([(f"token_id:{t}", lp)] + [(f"token_id:{o}", cls.logprob(o, c, j))
                                                                for o in range(top) if o != t][:max(top - 1, 0)])
                                 for j, (t, lp) in enumerate(generated)],
                "text_offset": list(range(len(generated)))}
            choice: Dict[str, Any] = {"index": c, "text": "", "finish_reason": "length", "stop_reason": None,
                                      "logprobs": logprobs}
            if k is not None:
                choice["prompt_logprobs"] = [
                    None if p is None else {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": ""}
                                            for r, (t, lp) in enumerate(p)} for p in cls.topk(prompt, k)]
            if request.get("return_token_ids"):
                choice.update(prompt_token_ids=prompt, token_ids=[t for t, _ in generated])
            choices.append(choice)
        return {"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()),
                "model": request.get("model", "stub"), "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": n * count,
                          "total_tokens": len(prompt) + n * count}}

    @classmethod
    def atropos(cls, request: Dict[str, Any]) -> Dict[str, Any]:
        raw = request.get("prompt")
        prompt = cls.prompt_ids(raw.get("prompt_token_ids") if isinstance(raw, dict) else raw)
        n, count = cls.counts(request, "max_tokens")
        generated = cls.outputs(prompt, n, count)
        answer: Dict[str, Any] = {"text": [""] * n, "prompt": "", "finish_reasons": ["length"] * n}
        if request.get("logprobs") is not None:
            answer.update(logprobs=[[[{str(t): lp}] for t, lp in g] for g in generated], prompt_token_ids=prompt,
                          token_ids=[[t for t, _ in g] for g in generated])
        k = cls.top(request, "prompt_logprobs")
        if k is not None:
            answer["prompt_logprobs"] = [None if p is None else {str(t): lp for t, lp in p} for p in cls.topk(prompt, k)]
        return answer

    @classmethod
    def sglang(cls, request: Dict[str, Any]) -> Any:
        prompt = cls.prompt_ids(request["text"] if "text" in request else request.get("input_ids"))
        params = request.get("sampling_params") or {}
        n, count = cls.counts(params, "max_new_tokens")
        results = []
        for c, generated in enumerate(cls.outputs(prompt, n, count)):
            meta: Dict[str, Any] = {"id": "stub", "prompt_tokens": len(prompt), "completion_tokens": count,
                                    "finish_reason": {"type": "length", "length": count}}
            if request.get("return_logprob"):
                meta["output_token_logprobs"] = [[lp, t, None] for t, lp in generated]
                # from logprob_start_len, by default SGLang's: the last prompt id; the first logprob null
                start = request.get("logprob_start_len", -1)
                start = start if type(start) is int and 0 <= start < len(prompt) else len(prompt) - 1
                meta["input_token_logprobs"] = [[None if i == start else cls.logprob(t, 0, i), t, None]
                                                for i, t in enumerate(prompt) if i >= start]
                if request.get("logprob_start_len") == 0:
                    k = cls.top(request, "top_logprobs_num")
                    if k:
                        meta["input_top_logprobs"] = [None if p is None else [[lp, t, None] for t, lp in p]
                                                      for p in cls.topk(prompt, k)]
            results.append({"text": "", "output_ids": [t for t, _ in generated], "meta_info": meta})
        return results if n > 1 else results[0]


class StubServer:
    """An OpenAI-compatible server that answers at once (or after ``latency``) without a model.

    Routes: ``GET /health``, ``/health_generate`` (SGLang's; 404 with ``health_generate=False``,
    as vLLM), ``/v1/models``, ``/stub/stats``; ``POST /v1/chat/completions`` and
    ``/v1/completions`` with ``n``, ``max_tokens`` and ``stream`` (+ ``include_usage``).
    The token protocols too (``StubTokens``), so that ``managed_server`` runs without a GPU:
    ``/v1/completions`` with token ids as vLLM answers them, ``POST /generate`` in Atropos' or
    SGLang's shape (by the body; 404 with ``generate=False``, as a stock vLLM).
    Failure knobs: ``fail_rate`` answers that share of completions with ``fail_status``;
    ``die_after`` drops every connection and stops after that many completions, like a crash.
    Idle keep-alive connections are closed after ``keep_alive_timeout`` s, as uvicorn does.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency: float = 0.0, fail_rate: float = 0.0,
                 fail_status: int = 500, die_after: Optional[int] = None, keep_alive_timeout: float = 5.0,
                 model: str = "stub", health_generate: bool = True, generate: bool = True,
                 seed: Optional[int] = None):
        self.host, self.port = host, port
        self.generate = generate
        self.latency, self.fail_rate, self.fail_status = latency, fail_rate, fail_status
        self.die_after, self.keep_alive_timeout = die_after, keep_alive_timeout
        self.model, self.health_generate = model, health_generate
        self.name = ""
        self._random = random.Random(seed)
        self.received = self.completed = self.in_flight = self.max_in_flight = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: Dict[asyncio.StreamWriter, asyncio.Task] = {}
        self.died: Optional[asyncio.Event] = None  # made in start(), inside the running loop

    async def start(self) -> "StubServer":
        self.died = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self.name = f"{socket.gethostname()}:{self.port}"
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            handlers = list(self._connections.values())
            for writer in list(self._connections):
                writer.transport.abort()
            current = asyncio.current_task()
            await asyncio.gather(*(t for t in handlers if t is not current), return_exceptions=True)
            await server.wait_closed()

    def stats(self) -> Dict[str, Any]:
        return {"name": self.name, "port": self.port, "received": self.received, "completed": self.completed,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections[writer] = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            while True:
                idle = loop.call_later(self.keep_alive_timeout, writer.transport.close)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                finally:
                    idle.cancel()
                lines = head[:-4].split(b"\r\n")
                m = _REQUEST_LINE.match(lines[0])
                if not m:
                    writer.write(self._response(400, {"error": "bad request line"}, close=True))
                    break
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                close = headers.get(b"connection", b"").lower() == b"close" or m.group(3) == b"0"
                if not await self._answer(m.group(1), m.group(2).decode("latin-1"), body, writer, close):
                    break
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self._connections.pop(writer, None)
            writer.close()

    async def _answer(self, method: bytes, path: str, body: bytes, writer: asyncio.StreamWriter, close: bool) -> bool:
        """Write one response; False when the connection must end without one (a crash)."""
        path = path.split("?", 1)[0]
        routes_get = {"/health": None, "/v1/models": {"object": "list", "data": [{"id": self.model, "object": "model"}]},
                      "/stub/stats": None}
        if self.health_generate:
            routes_get["/health_generate"] = None
        if path in ("/v1/chat/completions", "/v1/completions") or (path == "/generate" and self.generate):
            if method != b"POST":
                writer.write(self._response(405, {"detail": "Method Not Allowed"}, close))
                return True
            return await self._complete(path, body, writer, close)
        if path not in routes_get:
            writer.write(self._response(404, {"detail": "Not Found"}, close))
        elif method != b"GET":
            writer.write(self._response(405, {"detail": "Method Not Allowed"}, close))
        elif path == "/stub/stats":
            writer.write(self._response(200, self.stats(), close))
        else:
            writer.write(self._response(200, routes_get[path], close))
        return True

    async def _complete(self, path: str, body: bytes, writer: asyncio.StreamWriter, close: bool) -> bool:
        self.received += 1
        if self.die_after is not None and self.received > self.die_after:
            log.warning("stub server %s: dying after %d completions (die_after)", self.name, self.die_after)
            self.died.set()
            asyncio.ensure_future(self.stop())
            return False
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.fail_rate and self._random.random() < self.fail_rate:
                writer.write(self._response(self.fail_status, {"error": {"message": "stub failure (fail_rate)",
                                                                         "code": self.fail_status}}, close))
                return True
            if path == "/generate" or (path == "/v1/completions" and StubTokens.asked(body)):
                status, payload = StubTokens.answer(path, body)
                if status == 200:
                    self.completed += 1
                writer.write(self._response(status, payload, close))
                return True
            try:
                request = json.loads(body)
                chat = path.endswith("/chat/completions")
                n, max_tokens = int(request.get("n", 1)), int(request.get("max_tokens", 16))
                if chat and not isinstance(request.get("messages"), list):
                    raise ValueError("'messages' must be a list")
                if not chat and "prompt" not in request:
                    raise ValueError("'prompt' is required")
                if n < 1 or max_tokens < 1:
                    raise ValueError("n and max_tokens must be at least 1")
            except (ValueError, TypeError, AttributeError) as e:
                writer.write(self._response(400, {"error": {"message": f"invalid request: {e}", "code": 400}}, close))
                return True
            self.completed += 1
            text = f"stub reply from {self.name}"
            usage = {"prompt_tokens": 8, "completion_tokens": n * max_tokens, "total_tokens": 8 + n * max_tokens}
            kind = "chat.completion" if chat else "text_completion"
            ident = f"{'chatcmpl' if chat else 'cmpl'}-stub-{self.completed}"
            if request.get("stream"):
                writer.write(self._stream(ident, kind, chat, n, text, usage, request, close))
                return True
            choices = [{"index": i, "finish_reason": "length", "logprobs": None,
                        **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                       for i in range(n)]
            writer.write(self._response(200, {"id": ident, "object": kind, "created": int(time.time()),
                                              "model": request.get("model", self.model), "choices": choices,
                                              "usage": usage, "system_fingerprint": f"stub-{self.name}"}, close))
            return True
        finally:
            self.in_flight -= 1

    def _stream(self, ident, kind, chat, n, text, usage, request, close) -> bytes:
        base = {"id": ident, "object": kind + ".chunk" if chat else kind, "created": int(time.time()),
                "model": request.get("model", self.model)}
        events = []
        for i in range(n):
            for delta, finish in (((text[:5]), None), (text[5:], "length")):
                piece = {"delta": {"role": "assistant", "content": delta}} if chat else {"text": delta}
                events.append(dict(base, choices=[dict(piece, index=i, finish_reason=finish)]))
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append(dict(base, choices=[], usage=usage))
        datas = [json.dumps(e, separators=(",", ":")).encode() for e in events] + [b"[DONE]"]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(d) + 8, b"data: " + d + b"\n\n") for d in datas)
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
        return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + chunks + b"0\r\n\r\n"

    def _response(self, status: int, payload: Any, close: bool) -> bytes:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\ncontent-length: {len(body)}\r\n"
        if payload is not None:
            head += "content-type: application/json\r\n"
        if close:
            head += "connection: close\r\n"
        return (head + "\r\n").encode() + body


# =============================================================================================
# Watcher: one per inference node; server health to Weights & Biases or JSON lines
# =============================================================================================

WATCHER_HEALTH_PATH = "/health_generate"  # Atropos' Slurm guide's; vLLM answers 404 there, so we fall back
WATCHER_FALLBACK_PATH = "/health"
WANDB_FINISH_TIMEOUT = 10.0  # how long the end waits for wandb to finish the run (Slurm's KillWait: 30 s)
WANDB_INIT_TIMEOUT = 90.0  # how long --once waits for wandb.init: wandb's own limit (init_timeout)
MAX_WANDB_BACKLOG = 100  # rows waiting for wandb (while init runs), beyond which rows are dropped


@dataclasses.dataclass
class WatcherOptions:
    """Everything the watcher needs; built and validated from the CLI flags."""

    api_addr: str
    node_num: int
    ports: List[int]
    host: str = "localhost"
    interval: float = 60.0
    health_path: str = WATCHER_HEALTH_PATH
    probe_timeout: float = 5.0
    once: bool = False
    use_wandb: bool = True
    legacy_metric_names: bool = False
    layout: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def metric(self, index: int) -> str:
        """``server/server_health_{node}_{i}``; on request ``server_heath``, as Atropos' Slurm guide spells it."""
        word = "server_heath" if self.legacy_metric_names else "server_health"
        return f"server/{word}_{self.node_num}_{index}"


class TrainerAPI:
    """The trainer's ``run-api``: ``/wandb_info`` (project, group) and ``/status`` (current_step).

    Each call is bounded by ``timeout`` as a whole.  Unreachable or garbage answers (anything
    but the schema: not JSON, JSON nested too deep to parse, wrong types, a step out of range,
    so that none is taken for recovery) are logged once per outage and reported as None, so
    the watcher keeps probing and logging locally while the trainer is away.
    """

    def __init__(self, api_addr: str, timeout: float):
        self.api_addr, self.timeout = api_addr.rstrip("/"), timeout
        self._prefix = parse_base_url(self.api_addr)[3]
        self._failing = False

    async def _get(self, path: str, valid: Callable[[Dict[str, Any]], bool]) -> Optional[Dict[str, Any]]:
        """The JSON object at ``path`` if ``valid`` accepts it, else None."""
        url = self.api_addr + path
        try:
            status, body = await http_get(self.api_addr, self._prefix + path, self.timeout)
            if status != 200:
                raise APIStatusError(status, error_message(body), url)
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: [[[[... nested past the parser's depth
                data = None
            if not (isinstance(data, dict) and valid(data)):
                raise ProtocolError(f"unexpected answer {body[:80]!r}", url)
        except ServerError as e:
            if not self._failing:
                log.warning("trainer API unavailable: %s (will keep trying)", e)
            self._failing = True
            return None
        if self._failing:
            log.info("trainer API at %s is back", self.api_addr)
        self._failing = False
        return data

    async def wandb_info(self) -> Optional[Tuple[Optional[str], Optional[str]]]:
        """(project, group) once a trainer has registered (both are null before), else None.

        A trainer may register an empty project: that is still a registration, so it becomes
        None (wandb's default project) rather than keeping the watcher waiting forever.
        """
        data = await self._get("/wandb_info", lambda d: all(k in d and (d[k] is None or type(d[k]) is str)
                                                            for k in ("project", "group")))
        if data is None or (data["project"] is None and data["group"] is None):
            return None
        return data["project"] or None, data["group"] or None

    async def current_step(self) -> Optional[int]:
        data = await self._get("/status", lambda d: type(d.get("current_step")) is int
                               and 0 <= d["current_step"] < 1 << 63)
        return None if data is None else data["current_step"]


class _CallThread:
    """Run blocking calls one after another, in order, on a daemon thread; each gives a future.

    For wandb, whose calls cannot be interrupted: ``wandb.init`` against an unreachable W&B
    server blocks for 90 s, ``finish`` for as long as it retries its uploads.  On the event loop
    that would stop the probes and hold SIGTERM.  Errors are logged, followed by what happens
    next (wandb raises many kinds; the watcher goes on).  A daemon thread, so that a call that
    never returns cannot keep the process alive.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._calls: deque = deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._work, name="atropos-slurm-wandb", daemon=True).start()

    def __len__(self) -> int:
        return len(self._calls)

    def submit(self, what: str, call: Callable[[], None], after_error: str) -> "asyncio.Future[None]":
        ended = self._loop.create_future()
        with self._ready:
            self._calls.append((what, call, after_error, ended))
            self._ready.notify()
        return ended

    def _work(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._calls)
                what, call, after_error, ended = self._calls.popleft()
            try:
                call()
            except Exception as e:
                log.error("%s failed: %s (%s)", what, e, after_error)
            try:
                self._loop.call_soon_threadsafe(_set_done, ended)
            except RuntimeError:  # the loop is closed: the watcher ended without this call
                return


def _set_done(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


class WandbSink:
    """Log records to a W&B run in the trainer's project, grouped per job, one run per node.

    The run starts once the trainer registered its project at ``/wandb_info``.  W&B's own step
    only increases, so it is left to W&B; the trainer's step is logged as the metric
    ``trainer_step`` and set as the x-axis of the ``server/*`` metrics, so a trainer that
    restarts with a smaller step never makes W&B drop a row.

    wandb never holds the watcher: its calls run in order on their own thread (``_CallThread``)
    and the loop does not wait for them; rows wait there while ``wandb.init`` runs, at most
    ``MAX_WANDB_BACKLOG`` of them.  ``finish`` waits a bounded time; ``abandoned`` then says
    that wandb never returned, and the process must not wait for wandb's own exit handler.
    """

    def __init__(self, wandb_module: Any, options: WatcherOptions, api: TrainerAPI):
        self.wandb, self.options, self.api = wandb_module, options, api
        self.run: Any = None
        self.abandoned = False
        self._calls: Optional[_CallThread] = None
        self._starting: Optional[asyncio.Future] = None  # wandb.init, submitted and not failed
        self._behind = False  # rows are being dropped: said once

    async def log(self, record: Dict[str, Any]) -> None:
        if self._starting is None:
            info = await self.api.wandb_info()
            if info is None:
                log.info("round %d: %d/%d servers healthy; waiting for the trainer to register a W&B project at %s",
                         record["round"], record[f"server/healthy_servers_{self.options.node_num}"],
                         len(self.options.ports), self.options.api_addr)
                return
            self._starting = self._submit("wandb.init", lambda: self._start(*info), "will retry next round")
        if len(self._calls) >= MAX_WANDB_BACKLOG:
            if not self._behind:
                log.warning("wandb is %d calls behind (is the W&B server reachable?): dropping rows until it "
                            "catches up", len(self._calls))
            self._behind = True
            return
        self._behind = False
        row = {k: v for k, v in record.items() if k.startswith("server/") or k in ("trainer_step", "round")}
        self._submit("wandb.log", lambda: self._on_run("log", row), "the watcher goes on")

    def _submit(self, what: str, call: Callable[[], None], after_error: str) -> "asyncio.Future[None]":
        if self._calls is None:
            self._calls = _CallThread(asyncio.get_running_loop())
        return self._calls.submit(what, call, after_error)

    def _start(self, project: Optional[str], group: Optional[str]) -> None:
        """On the wandb thread: ``wandb.init``; after a failure the next round tries again."""
        name = f"inf_node_{self.options.node_num}"
        # Slurm ends a step by signalling all its processes, wandb's service too, which then dies
        # without writing what it buffered (15 s by default; an offline run's only copy): have it
        # write every round.  Versions without this (private) setting ignore the variable.
        os.environ.setdefault("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", f"{self.options.interval:g}")
        try:
            run = self.wandb.init(project=project, group=group, name=name, job_type="inference_watcher",
                                  config=self.options.layout)
            run.define_metric("trainer_step")
            run.define_metric("server/*", step_metric="trainer_step")
        except BaseException:
            self._starting = None
            raise
        self.run = run
        log.info("logging to W&B project %r group %r as run %s", project, group, name)

    def _on_run(self, method: str, *args: Any) -> None:
        """On the wandb thread: ``run.log(row)`` or ``run.finish()``; nothing if init failed."""
        if self.run is not None:
            getattr(self.run, method)(*args)

    async def finish(self, stopped: bool) -> None:
        """Finish the run, waiting at most ``WANDB_FINISH_TIMEOUT`` (Slurm's KillWait is 30 s).

        Stopped by a signal while ``wandb.init`` has not returned, there is no run to finish:
        nothing is waited for.  Otherwise (``--once``) that init gets ``WANDB_INIT_TIMEOUT``.
        """
        starting = self._starting
        if starting is None:
            return
        if not starting.done():
            if not stopped:
                await asyncio.wait({starting}, timeout=WANDB_INIT_TIMEOUT)
            if not starting.done():
                log.warning("wandb.init has not returned: exiting without a W&B run")
                self.abandoned = True
                return
        ended = self._submit("wandb.finish", lambda: self._on_run("finish"), "exiting")
        await asyncio.wait({ended}, timeout=WANDB_FINISH_TIMEOUT)
        if not ended.done():
            log.warning("wandb has not finished the run within %g s: exiting without it", WANDB_FINISH_TIMEOUT)
            self.abandoned = True


class JsonLinesSink:
    """Write each record as one JSON line (``node_num`` and ``time`` added): without wandb, or
    with ``--no-wandb``.  The same interface as ``WandbSink``, so the watcher has one path."""

    abandoned = False

    def __init__(self, node_num: int, out: Any):
        self.node_num, self.out = node_num, out

    async def log(self, record: Dict[str, Any]) -> None:
        self.out.write(json.dumps(dict(record, node_num=self.node_num, time=round(time.time(), 3))) + "\n")
        self.out.flush()

    async def finish(self, stopped: bool) -> None:
        pass  # every line was flushed as it was written


def import_wandb() -> Any:
    """wandb if installed, else None (the watcher then writes JSON lines)."""
    try:
        import wandb  # optional extra: pip install atropos-slurm[wandb]
    except ImportError:
        return None
    return wandb


def open_sink(options: WatcherOptions, api: TrainerAPI, out: Any = None) -> Any:
    """A ``WandbSink`` if wandb is installed and wanted, else a ``JsonLinesSink`` on ``out`` (stdout)."""
    wandb_module = import_wandb() if options.use_wandb else None
    if wandb_module is not None:
        return WandbSink(wandb_module, options, api)
    if options.use_wandb:
        log.warning("wandb is not installed: writing the health records to stdout as JSON lines")
    else:
        log.info("--no-wandb: writing the health records to stdout as JSON lines")
    return JsonLinesSink(options.node_num, out or sys.stdout)


async def watch(options: WatcherOptions, stop: asyncio.Event, api: TrainerAPI, sink: Any) -> bool:
    """Run the watcher loop until ``stop`` is set (or one round with ``once``), then finish ``sink``.

    Every round reads the trainer's step, probes all local servers concurrently and logs one
    record: 1/0 per server, the number healthy, the step.  Between rounds it waits on ``stop``,
    so a signal ends it at once.  Returns whether the last round saw every server healthy.
    """
    urls = [ServerAddress(options.host, port, options.node_num, i).url for i, port in enumerate(options.ports)]
    prober = HealthProber(urls, options.health_path, options.probe_timeout, WATCHER_FALLBACK_PATH)
    all_healthy, round_number, last_step = False, 0, None
    try:
        while True:
            round_number += 1
            step = await api.current_step()
            last_step = step if step is not None else last_step
            health = await prober.probe()
            all_healthy = all(health)
            record: Dict[str, Any] = {options.metric(i): int(ok) for i, ok in enumerate(health)}
            record[f"server/healthy_servers_{options.node_num}"] = sum(health)
            record.update(trainer_step=last_step if last_step is not None else 0, round=round_number)
            await sink.log(record)
            if options.once or await _stopped_within(stop, options.interval):
                return all_healthy
    finally:
        await sink.finish(stopped=stop.is_set())


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; whether it is."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
    return stop.is_set()


def run_watcher(options: WatcherOptions) -> int:
    """Run ``watch`` with SIGTERM/SIGINT finishing the W&B run; exit 0 (``--once``: 1 if unhealthy).

    If wandb never returned from a call, the process ends here with ``os._exit``: wandb's own
    exit handler would wait for its service, which goes on retrying an unreachable W&B server
    until Slurm kills the step.
    """
    api = TrainerAPI(options.api_addr, options.probe_timeout)
    sink = open_sink(options, api)

    async def main() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await watch(options, stop, api, sink)

    code = 0 if asyncio.run(main()) or not options.once else 1
    if sink.abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# =============================================================================================
# CLI: python -m atropos_slurm discover | hostnames | wait | watch | stub-server | run-env | demo
# =============================================================================================


class _StderrHandler(logging.StreamHandler):
    """Log to whatever ``sys.stderr`` is now (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors become ``ConfigError`` so that ``main`` reports them like every other error."""

    def error(self, message: str):
        raise ConfigError(message)


def _add_discovery_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("discovery (each flag overrides its environment variable)")
    group.add_argument("--nodelist", help="Slurm hostlist (default: $SLURM_JOB_NODELIST, then $SLURM_NODELIST)")
    group.add_argument("--num-training-nodes", metavar="N", help="leading nodes that train (default: $NUM_TRAINING_NODES)")
    group.add_argument("--tp", metavar="N", help="tensor-parallel size of each server (default: $INFER_TP or 1)")
    group.add_argument("--pp", metavar="N", help="pipeline-parallel size of each server (default: $INFER_PP or 1)")
    group.add_argument("--gpus-per-node", metavar="N", help=f"default: ${ENV_GPUS_PER_NODE}, then the job's "
                       f"$SLURM_GPUS_PER_NODE, then {DEFAULT_GPUS_PER_NODE}")
    group.add_argument("--base-port", metavar="P", help=f"port of server 0 (default: ${ENV_BASE_PORT} or {DEFAULT_BASE_PORT})")
    group.add_argument("--hostlist-backend", choices=HOSTLIST_BACKENDS,
                       help=f"how to expand the nodelist (default: ${ENV_HOSTLIST_BACKEND} or auto)")
    group.add_argument("--servers", metavar="URLS", help=f"these server URLs (or @FILE of them) instead of Slurm "
                       f"discovery (default: ${ENV_SERVERS})")


def _discover(args: argparse.Namespace) -> Discovery:
    return discover_servers(args.nodelist, args.num_training_nodes, args.tp, args.gpus_per_node, args.base_port,
                            args.hostlist_backend, pp=args.pp, servers=args.servers)


def cmd_discover(args: argparse.Namespace) -> int:
    found = _discover(args)
    if args.explain:
        for line in found.explain():
            print(f"discover: {line}", file=sys.stderr)
    print(json.dumps(found.to_json(), indent=2) if args.format == "json" else "\n".join(found.urls))
    return 0


def cmd_hostnames(args: argparse.Namespace) -> int:
    names, _ = resolve_hostnames(args.hostlist, args.hostlist_backend or "python")
    print("\n".join(names))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    found = _discover(args)
    urls = found.urls
    need = len(urls) if args.min_healthy is None else _int_setting("--min-healthy", args.min_healthy,
                                                                     minimum=1, maximum=len(urls))
    timeout = _float_setting("--timeout", args.timeout, above=0)
    down = asyncio.run(wait_for_servers(urls, min_healthy=need, timeout=timeout,
                                        interval=_float_setting("--interval", args.interval, above=0),
                                        health_path=check_request_path("--health-path", args.health_path),
                                        probe_timeout=_float_setting("--probe-timeout", args.probe_timeout, above=0)))
    if down:
        print(f"wait: fewer than {need} of {len(urls)} servers healthy after {timeout:g} s; down: "
              + "; ".join(down), file=sys.stderr)
        return 1
    print(f"wait: ready ({need} of {len(urls)} required)", file=sys.stderr)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    layout = server_layout(args.tp, args.gpus_per_node, args.base_port, pp=args.pp,
                           het_group=inference_het_group(os.environ))
    try:
        parse_base_url(args.api_addr)
    except ConfigError:  # its message speaks of base_url and /v1: name this flag instead
        raise ConfigError(f"--api_addr={_shown_url(args.api_addr)} must look like http://trainer:8000") from None
    node_num = _int_setting("--node_num", args.node_num, minimum=0)
    check_request_path("--health-path", args.health_path)
    if node_num % layout.nodes_per_server:  # a job script may start one watcher per node: not an error
        head = node_num - node_num % layout.nodes_per_server
        log.info("inference node %d serves nothing itself: each server spans %d nodes and listens on the first "
                 "of its group; the watcher of inference node %d watches it. Nothing to do here.",
                 node_num, layout.nodes_per_server, head)
        return 0
    ports, per_node, base = layout.ports, layout.servers_per_node, layout.base_port
    options = WatcherOptions(
        api_addr=args.api_addr, node_num=node_num, ports=ports, host=check_host("--host", args.host),
        interval=_float_setting("--interval", args.interval, above=0), health_path=args.health_path,
        probe_timeout=_float_setting("--probe-timeout", args.probe_timeout, above=0), once=args.once,
        use_wandb=not args.no_wandb, legacy_metric_names=args.legacy_metric_names,
        layout={"node_num": node_num, "host": args.host, "tp": layout.tp, "pp": layout.pp,
                "gpus_per_node": layout.gpus_per_node, "gpus_per_node_from": layout.gpus_from,
                "nodes_per_server": layout.nodes_per_server, "base_port": base, "ports": ports,
                "health_path": args.health_path, "api_addr": args.api_addr,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    )
    layout.warn_idle_gpus()
    log.info("watching %d servers on %s ports %d-%d; trainer API %s", per_node, args.host, ports[0], ports[-1],
             args.api_addr)
    return run_watcher(options)


def cmd_stub_server(args: argparse.Namespace) -> int:
    count = _int_setting("--count", args.count, minimum=1, maximum=64)
    port = _int_setting("--port", args.port, minimum=0, maximum=65535 - count + 1)
    options = dict(latency=_float_setting("--latency", args.latency, minimum=0),
                   fail_rate=_float_setting("--fail-rate", args.fail_rate, minimum=0, maximum=1),
                   fail_status=_int_setting("--fail-status", args.fail_status, minimum=100, maximum=599),
                   die_after=None if args.die_after is None else _int_setting("--die-after", args.die_after, minimum=0),
                   keep_alive_timeout=_float_setting("--keep-alive-timeout", args.keep_alive_timeout, above=0))
    check_host("--host", args.host)

    async def main() -> int:
        stubs = [StubServer(args.host, port + i if port else 0, model=args.model,
                            health_generate=not args.no_health_generate, generate=not args.no_generate, **options)
                 for i in range(count)]
        try:
            for stub in stubs:
                await stub.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {args.host}:{port}: {e.strerror or e}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waits = [asyncio.ensure_future(stop.wait())] + [asyncio.ensure_future(s.died.wait()) for s in stubs]
        print(f"stub-server: listening on {args.host} port(s) {', '.join(str(s.port) for s in stubs)}",
              file=sys.stderr, flush=True)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        for stub in stubs:
            await stub.stop()
        return 1 if any(s.died.is_set() for s in stubs) else 0

    return asyncio.run(main())


def ephemeral_port_range() -> Tuple[int, int]:
    """The ports the kernel gives outgoing connections (Linux's ``ip_local_port_range``; its
    default 32768-60999 elsewhere).  A listener placed inside it can find its port taken by a
    client socket of its own machine, so servers started here sit below it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def reserve_port_block(count: int, host: str = "127.0.0.1", preferred: Optional[int] = None) -> List[Any]:
    """``count`` sockets bound (not listening: a connection is refused) to consecutive ports below
    the ephemeral range, ``preferred`` first if free; the caller closes them just before a
    server takes the ports.  The one port picker of the demo, the tests and the benchmarks."""
    top = max(ephemeral_port_range()[0], 10000 + count + 1) - count
    candidates = ([preferred] if preferred else []) + [random.randrange(10000, top) for _ in range(200)]
    for base in candidates:
        socks: List[Any] = []
        try:
            for port in range(base, base + count):
                socks.append(socket.socket())
                socks[-1].bind((host, port))
            return socks
        except OSError:
            for sock in socks:
                sock.close()
    raise ConfigError(f"no {count} consecutive free ports below the ephemeral range on {host}")


def free_port_block(count: int, host: str = "127.0.0.1", preferred: Optional[int] = None) -> int:
    """The first of ``count`` consecutive ports that were free a moment ago (``reserve_port_block``)."""
    socks = reserve_port_block(count, host, preferred)
    base = socks[0].getsockname()[1]
    for sock in socks:
        sock.close()
    return base


async def run_demo(requests: int = 4000, servers: int = 8, out=None) -> List[Dict[str, Any]]:
    """Start stub servers, discover them the Slurm way, load them, kill one half way, show a table."""
    out = out or sys.stdout
    base = free_port_block(servers, preferred=DEFAULT_BASE_PORT)
    stubs = [await StubServer("127.0.0.1", base + i, latency=0.002).start() for i in range(servers)]
    found = discover_servers(nodelist="localhost", num_training_nodes=0, tp=1, gpus_per_node=servers,
                             base_port=base, backend="python")
    print(f"demo: {servers} stub servers; discovered {found.urls[0]} .. {found.urls[-1]}", file=out)
    template = ServerBaseline(timeout=10, num_max_requests_at_once=32, model_name="stub")
    manager = ServerManager(configs_for_urls(template, found.urls), retry_backoff=0.02, health_probe_interval=0.5)
    victim, victim_url, finished, failed = stubs[servers // 2], found.urls[servers // 2], 0, 0
    # A terminal gets one progress line redrawn in place; a file or a pipe gets whole lines.
    redraw, end, after_progress = ("\r", "", "\n") if out.isatty() else ("", "\n", "")

    async def one(i: int) -> None:
        nonlocal finished, failed
        try:
            await manager.chat_completion(messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8)
        except AtroposSlurmError:
            failed += 1
        finished += 1
        if finished == requests // 2:
            print(f"{after_progress}demo: stopping {victim_url} half way", file=out)
            asyncio.ensure_future(victim.stop())

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(requests)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
        print(f"{redraw}demo: {finished}/{requests} done, {failed} failed, {time.monotonic() - started:.1f} s",
              end=end, file=out, flush=True)
    elapsed = time.monotonic() - started
    rows = manager.stats()
    print(f"{after_progress}demo: {requests} requests in {elapsed:.2f} s ({requests / elapsed:.0f}/s), "
          f"{failed} lost\n", file=out)
    print(f"{'server':<28} {'requests':>8} {'errors':>6} {'p50 ms':>7} {'healthy':>7}", file=out)
    for row in rows:
        p50 = f"{row['p50'] * 1000:.1f}" if row["p50"] is not None else "-"
        print(f"{row['url']:<28} {row['done']:>8} {row['failed']:>6} {p50:>7} {str(row['healthy']):>7}", file=out)
    await manager.close()
    for stub in stubs:
        await stub.stop()
    if failed:
        raise AtroposSlurmError(f"demo lost {failed} requests")
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    asyncio.run(run_demo(_int_setting("--requests", args.requests, minimum=8, maximum=1_000_000)))
    return 0


def cmd_run_env(args: argparse.Namespace) -> int:
    run_env(args.script, args.args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="atropos-slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    commands.required = True

    p = commands.add_parser("discover", help="print the inference server URLs of this Slurm job")
    _add_discovery_flags(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--explain", action="store_true", help="say on stderr how each number was decided")
    p.set_defaults(func=cmd_discover)

    p = commands.add_parser("hostnames", help="expand a hostlist like 'scontrol show hostnames'")
    p.add_argument("hostlist")
    p.add_argument("--hostlist-backend", choices=HOSTLIST_BACKENDS, help="default: python")
    p.set_defaults(func=cmd_hostnames)

    p = commands.add_parser("wait", help="block until the discovered servers are healthy")
    _add_discovery_flags(p)
    p.add_argument("--timeout", default="600", help="give up after this many seconds (600)")
    p.add_argument("--min-healthy", metavar="N", help="succeed once N servers are healthy (default: all)")
    p.add_argument("--health-path", default="/health", help="GET path probed on each server (/health)")
    p.add_argument("--interval", default="2", help="seconds between rounds (2)")
    p.add_argument("--probe-timeout", default="5", help="seconds per probe (5)")
    p.set_defaults(func=cmd_wait)

    p = commands.add_parser("watch", help="log this node's server health to W&B (or JSON lines)")
    add_watcher_flags(p)
    p.set_defaults(func=cmd_watch)

    p = commands.add_parser("stub-server", help="serve a fake OpenAI API (no GPU) for smoke tests")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", default="9000", help="port of the first server (9000; 0 = any free port)")
    p.add_argument("--count", default="1", help="serve this many consecutive ports (1)")
    p.add_argument("--latency", default="0", help="seconds before each completion answer (0)")
    p.add_argument("--fail-rate", default="0", help="share of completions answered with --fail-status, 0 to 1 (0)")
    p.add_argument("--fail-status", default="500", help="HTTP status of those answers (500)")
    p.add_argument("--die-after", metavar="N", help="drop all connections and exit 1 after N completions")
    p.add_argument("--keep-alive-timeout", default="5", help="close idle connections after S s (5)")
    p.add_argument("--model", default="stub")
    p.add_argument("--no-health-generate", action="store_true", help="answer 404 on /health_generate, as vLLM")
    p.add_argument("--no-generate", action="store_true",
                   help="answer 404 on POST /generate, as a stock vLLM (token ids then come from /v1/completions)")
    p.set_defaults(func=cmd_stub_server)

    p = commands.add_parser("run-env", help="run an Atropos environment script (serve, process, ...) on our manager")
    p.add_argument("script", help="the environment's .py file, run as __main__ after patch_atropos()")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments, e.g. serve --slurm true")
    p.set_defaults(func=cmd_run_env)

    p = commands.add_parser("demo", help="8 stub servers, discovery, load, failover: no Slurm needed")
    p.add_argument("--requests", default="4000")
    p.set_defaults(func=cmd_demo)
    return parser


def watcher_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for the watcher alone (``inference_watcher.py``), reporting errors as ``main`` does."""
    parser = _ArgumentParser(prog=prog, description=description)
    add_watcher_flags(parser)
    parser.set_defaults(func=cmd_watch)
    return parser


def add_watcher_flags(parser: argparse.ArgumentParser) -> None:
    """The watcher's flags, shared by ``watch`` and ``inference_watcher.py``."""
    parser.add_argument("--api_addr", "--api-addr", required=True, help="trainer API, e.g. http://trainer:8000")
    parser.add_argument("--tp", help="tensor-parallel size of the servers (default: $INFER_TP or 1)")
    parser.add_argument("--pp", help="pipeline-parallel size of the servers (default: $INFER_PP or 1)")
    parser.add_argument("--node_num", "--node-num", required=True, help="index of this inference node (0, 1, ...)")
    parser.add_argument("--gpus-per-node", help=f"default: ${ENV_GPUS_PER_NODE}, then the job's $SLURM_GPUS_PER_NODE "
                        f"(its inference component's in a heterogeneous job), then {DEFAULT_GPUS_PER_NODE}")
    parser.add_argument("--base-port", help=f"port of server 0 (default: ${ENV_BASE_PORT} or {DEFAULT_BASE_PORT})")
    parser.add_argument("--host", default="localhost", help="where this node's servers listen (localhost)")
    parser.add_argument("--interval", default="60", help="seconds between rounds (60)")
    parser.add_argument("--health-path", default=WATCHER_HEALTH_PATH,
                        help=f"probed path ({WATCHER_HEALTH_PATH}; on 404, {WATCHER_FALLBACK_PATH})")
    parser.add_argument("--probe-timeout", default="5", help="seconds per probe and API call (5)")
    parser.add_argument("--once", action="store_true", help="one round, then exit 0 if all servers are healthy, else 1")
    parser.add_argument("--no-wandb", action="store_true", help="JSON lines on stdout even if wandb is installed")
    parser.add_argument("--legacy-metric-names", action="store_true",
                        help="log server/server_heath_* (as Atropos' Slurm guide misspells them) "
                             "instead of server_health")


def main(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run one command; the one place where errors become exit codes (2 = bad input or failure).

    A reader that goes away (``discover | head -1``) ends the command quietly with 141, the
    status of a Unix tool stopped by SIGPIPE.
    """
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("atropos-slurm: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    parser = parser or build_parser()
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here rather than as a traceback at exit
        return code
    except AtroposSlurmError as e:
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        try:  # what is still buffered must not fail again when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    # ``python -m atropos_slurm`` runs this file as __main__; the environments it runs import
    # atropos_slurm, a second copy whose classes are not these.  Everything runs in that one.
    import atropos_slurm

    sys.exit(atropos_slurm.main())
