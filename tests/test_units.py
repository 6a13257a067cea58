"""Unit tests of the dispatcher's pure parts, without sockets: ``Slots``, ``RetryPolicy``, the
body framers, ``_DeadlineQueue`` (on a fake clock), ``probe_waits``, the request-body JSON encoder,
``Attempts`` and ``RetryBudget`` (on a fake clock) and the manager's knobs (``manager_knobs``).

These are the pieces a change to dispatch is most likely to touch; each test names the rule it
holds.  Run: ``python -m pytest tests/test_units.py -q``.
"""

import asyncio
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atropos_slurm as a  # noqa: E402


# =============================================================================================
# Health probe waits
# =============================================================================================


class ProbeWaits(unittest.TestCase):
    def test_backoff_up_to_the_interval_each_step_jittered(self):
        waits = list(itertools.islice(a.probe_waits(5.0, random.Random(12)), 2000))
        steps = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2] + [5.0] * 1994
        for wait, step in zip(waits, steps):
            self.assertTrue(0.5 * step <= wait <= 1.5 * step, (wait, step))
        steady = waits[6:]
        self.assertAlmostEqual(sum(steady) / len(steady), 5.0, delta=0.25)  # once per interval on average

    def test_servers_marked_down_together_drift_apart(self):
        rng = random.Random(7)
        tenth = sorted(sum(itertools.islice(a.probe_waits(5.0, rng), 10)) for _ in range(100))
        self.assertGreater(tenth[-1] - tenth[0], 5.0)  # spread over more than an interval: no burst
        self.assertEqual(len(set(tenth)), 100)



# =============================================================================================
# Slots
# =============================================================================================


def make_slots(count, train=2, eval=1):
    """Slots over ``count`` servers named s0, s1, ... (any object is a server to Slots), and their records."""
    slots = a.Slots([f"s{i}" for i in range(count)], caps=[(train, eval)] * count)
    return slots, slots.records


class SlotsTest(unittest.IsolatedAsyncioTestCase):
    async def test_round_robin_over_servers_with_room(self):
        slots, (s0, s1, s2) = make_slots(3, train=2)
        taken = [slots.take("train") for _ in range(6)]
        self.assertEqual(taken, [s0, s1, s2, s0, s1, s2])
        self.assertIsNone(slots.take("train"), "every server is at its cap")
        self.assertEqual([s.in_flight["train"] for s in (s0, s1, s2)], [2, 2, 2])
        self.assertEqual(slots.in_flight_totals["train"], 6)

    async def test_splits_have_their_own_caps(self):
        slots, (s0,) = make_slots(1, train=1, eval=2)
        self.assertIs(slots.take("train"), s0)
        self.assertIsNone(slots.take("train"))
        self.assertIs(slots.take("eval"), s0)
        self.assertIs(slots.take("eval"), s0)
        self.assertIsNone(slots.take("eval"))
        self.assertEqual(s0.in_flight, {"train": 1, "eval": 2})
        self.assertEqual(slots.of("s0"), s0)

    async def test_avoid_is_a_last_resort(self):
        slots, (s0, s1) = make_slots(2, train=4)
        self.assertIs(slots.take("train", avoid=s0), s1, "the failed server's turn passes to the next one")
        slots.give_back(s1, "train")
        alone, (only,) = make_slots(1, train=4)
        self.assertIs(alone.take("train", avoid=only), only, "with no other server, the avoided one is used")

    async def test_a_freed_slot_goes_to_the_first_waiter_in_the_same_iteration(self):
        slots, (s0,) = make_slots(1, train=1)
        self.assertIs(slots.take("train"), s0)
        first, second = slots.wait("train"), slots.wait("train")
        self.assertIsNone(slots.take("train"), "newcomers queue behind waiters: first come, first served")
        slots.give_back(s0, "train")
        self.assertTrue(first.done(), "handed over at once, no loop iteration needed")
        self.assertIs(first.result(), s0)
        self.assertFalse(second.done())
        self.assertEqual(s0.in_flight["train"], 1, "the waiter's slot is already counted")
        slots.give_back(s0, "train")
        self.assertIs(second.result(), s0)

    async def test_take_never_jumps_queued_callers(self):
        """Not with a free slot appearing, nor with a preferred server that has room."""
        slots, (s0, s1) = make_slots(2, train=1)
        slots.take("train"), slots.take("train")
        waiter = slots.wait("train")
        slots.set_caps(s1, train=1, eval=1)  # no room yet: the waiter still waits
        self.assertFalse(waiter.done())
        s0.caps["train"] = 2  # room appears without a hand-over (a cap read directly): still behind the waiter
        self.assertIsNone(slots.take("train"))
        self.assertIsNone(slots.take("train", prefer=s0), "a preferred server does not jump the line")
        slots.give_back(s1, "train")
        self.assertIsNotNone(waiter.result())

    async def test_waiters_are_served_in_arrival_order(self):
        slots, (s0,) = make_slots(1, train=1)
        slots.take("train")
        waiters = [slots.wait("train") for _ in range(5)]
        order = []
        for _ in range(5):
            slots.give_back(s0, "train")
            order.append(next(i for i, w in enumerate(waiters) if w.done() and i not in order))
        self.assertEqual(order, [0, 1, 2, 3, 4])

    async def test_leaving_gives_back_a_slot_handed_over_just_before(self):
        slots, (s0,) = make_slots(1, train=1)
        slots.take("train")
        handed, next_one = slots.wait("train"), slots.wait("train")
        slots.give_back(s0, "train")
        self.assertTrue(handed.done())
        slots.leave(handed, "train")  # cancelled just as the slot arrived
        self.assertIs(next_one.result(), s0, "the slot moves on instead of leaking")
        self.assertEqual(s0.in_flight["train"], 1)

    async def test_waiters_leaving_from_the_middle_keep_the_rest_in_order(self):
        slots, (s0,) = make_slots(1, train=1)
        slots.take("train")
        waiters = [slots.wait("train") for _ in range(2000)]
        for w in waiters[1::2]:  # a mass cancellation: every other waiter, none at the front
            slots.leave(w, "train")
        self.assertEqual(slots.waiting("train"), 1000)
        self.assertEqual(len(slots._waiters["train"]), 1000, "those that left are out of the line at once")
        served = []
        for _ in range(1000):
            slots.give_back(s0, "train")
            served.append(next(i for i, w in enumerate(waiters) if w.done() and not w.cancelled() and i not in served))
        self.assertEqual(served, list(range(0, 2000, 2)), "the others, first come first served")
        self.assertTrue(all(w.cancelled() for w in waiters[1::2]))

    async def test_leaving_while_waiting_removes_the_waiter(self):
        slots, (s0,) = make_slots(1, train=1)
        slots.take("train")
        waiter = slots.wait("train")
        slots.leave(waiter, "train")
        self.assertTrue(waiter.cancelled())
        self.assertEqual(slots.waiting("train"), 0)
        slots.give_back(s0, "train")
        self.assertEqual(s0.in_flight["train"], 0)

    async def test_down_servers_are_skipped_and_rejoin_when_up(self):
        slots, (s0, s1) = make_slots(2, train=4)
        slots.set_healthy(s0, False, "connection refused")
        self.assertEqual((slots.healthy_count, s0.last_error), (1, "connection refused"))
        self.assertEqual(slots.healthy_records(), [s1])
        self.assertEqual([slots.take("train") for _ in range(3)], [s1, s1, s1])
        slots.set_healthy(s0, True)
        self.assertEqual(slots.healthy_count, 2)
        self.assertIn(s0, [slots.take("train") for _ in range(2)])

    async def test_last_server_down_wakes_every_waiter_with_none(self):
        slots, (s0,) = make_slots(1, train=1)
        slots.take("train")
        waiters = [slots.wait("train"), slots.wait("eval")]
        slots.set_healthy(s0, False)
        self.assertEqual([w.result() for w in waiters], [None, None], "each looks again and starts its deadline")

    async def test_a_server_back_up_serves_waiters_at_once(self):
        slots, (s0, s1) = make_slots(2, train=1)
        slots.set_healthy(s1, False)
        slots.take("train")
        waiter = slots.wait("train")
        slots.set_healthy(s1, True)
        self.assertIs(waiter.result(), s1)

    async def test_larger_caps_serve_waiters_at_once_and_smaller_ones_hold_new_calls(self):
        slots, (s0,) = make_slots(1, train=1)
        slots.take("train")
        waiters = [slots.wait("train"), slots.wait("train")]
        slots.set_caps(s0, train=3, eval=1)
        self.assertEqual([w.result() for w in waiters], [s0, s0])
        slots.set_caps(s0, train=1, eval=1)
        for _ in range(3):
            slots.give_back(s0, "train")
        self.assertIs(slots.take("train"), s0)
        self.assertIsNone(slots.take("train"), "the smaller cap holds")

    async def test_no_scan_over_the_servers_per_take(self):
        """The line holds only servers with room: taking from 4,096 servers touches one."""
        slots, many = make_slots(4096, train=1)
        taken = [slots.take("train") for _ in range(4096)]
        self.assertEqual(taken, many)
        self.assertEqual(len(slots._ready["train"]), 0, "full servers left the line")
        slots.give_back(many[7], "train")
        self.assertEqual(list(slots._ready["train"]), [many[7]])
        self.assertIs(slots.take("train", prefer=many[7]), many[7])
        self.assertEqual(slots.in_flight_totals["train"], 4096)


class SelectTest(unittest.TestCase):
    """``Slots.select``, the one selection step, as a table: the servers' state before (in
    flight / cap per server, healthy or not), avoid, prefer -> the server chosen, and the
    order of the next picks (round-robin)."""

    # (servers as (in_flight, cap, healthy), avoid, prefer, chosen, then the next two picks)
    TABLE = [
        ("round-robin from the front", [(0, 2, True), (0, 2, True), (0, 2, True)], None, None, 0, [1, 2]),
        ("full servers are skipped", [(2, 2, True), (0, 2, True), (1, 2, True)], None, None, 1, [2, 1]),
        ("down servers are skipped", [(0, 2, False), (0, 2, True)], None, None, 1, [1, None]),
        ("avoid passes its turn", [(0, 2, True), (0, 2, True)], 0, None, 1, [0, 1]),
        ("avoid when no other has room", [(0, 2, True), (2, 2, True)], 0, None, 0, [0, None]),
        ("prefer with room", [(0, 2, True), (0, 2, True), (0, 2, True)], None, 2, 2, [0, 1]),
        ("prefer full: round-robin", [(0, 2, True), (2, 2, True)], None, 1, 0, [0, None]),
        ("prefer down: round-robin", [(0, 2, True), (0, 2, False)], None, 1, 0, [0, None]),
        ("prefer that is avoided: round-robin", [(0, 2, True), (0, 2, True)], 1, 1, 0, [1, 0]),
        ("nobody has room", [(1, 1, True), (0, 1, False)], None, None, None, [None, None]),
    ]

    def test_table(self):
        for name, state, avoid, prefer, chosen, then in self.TABLE:
            with self.subTest(name):
                slots = a.Slots([f"s{i}" for i in range(len(state))], caps=[(cap, 1) for _, cap, _ in state])
                for record, (in_flight, _, healthy) in zip(slots.records, state):
                    record.in_flight["train"] = in_flight
                    slots.set_healthy(record, healthy)
                pick = slots.select("train", slots.records[avoid] if avoid is not None else None,
                                    slots.records[prefer] if prefer is not None else None)
                self.assertEqual(pick.index if pick else None, chosen)
                if pick is not None:
                    self.assertEqual(pick.in_flight["train"], state[chosen][0] + 1, "counted")
                nxt = [slots.select("train") for _ in then]
                self.assertEqual([r.index if r else None for r in nxt], then)


# =============================================================================================
# Retry policy
# =============================================================================================


def status(code, retry_after=None):
    return a.APIStatusError(code, "msg", "http://x/v1", retry_after)


class RetryPolicyTest(unittest.TestCase):
    POLICY = a.RetryPolicy(max_retries=2, backoff=0.5, backoff_max=8.0)

    def test_table(self):
        R = a.Retry
        table = [
            # error, attempt, expected (action, mark_down, delay)
            (a.StaleConnectionError("closed", "u"), 1, (R.RESEND, False, 0.0)),
            (a.ResponseTooLargeError("big", "u"), 1, (R.RAISE, False, 0.0)),
            (status(400), 1, (R.RAISE, False, 0.0)),
            (status(404), 1, (R.RAISE, False, 0.0)),
            (status(413), 1, (R.RAISE, False, 0.0)),
            (status(408), 1, (R.RETRY, False, 0.5)),
            (status(429), 2, (R.RETRY, False, 1.0)),
            (status(429, retry_after=3.0), 1, (R.RETRY, False, 3.0)),
            (status(429, retry_after=0.1), 2, (R.RETRY, False, 1.0)),
            (status(429, retry_after=a.MAX_RETRY_AFTER + 1), 1, (R.RAISE, False, 0.0)),
            (status(500), 1, (R.RETRY, True, 0.5)),
            (status(503, retry_after=a.MAX_RETRY_AFTER + 1), 1, (R.RAISE, True, 0.0)),
            (a.ServerConnectionError("refused", "u"), 3, (R.RETRY, True, 2.0)),
            (a.ServerTimeoutError("slow", "u"), 1, (R.RETRY, True, 0.5)),
            (a.ProtocolError("garbage", "u"), 1, (R.RETRY, True, 0.5)),
            (a.GenerationAbortedError("abort", "u"), 1, (R.RETRY, False, 0.5)),
            (a.ServerConnectionError("refused", "u"), 10, (R.RETRY, True, 8.0)),
        ]
        for error, attempt, expected in table:
            with self.subTest(error=repr(error), attempt=attempt):
                d = self.POLICY.decide(error, attempt, jitter=1.0)
                self.assertEqual((d.action, d.mark_down, d.delay), expected)

    def test_jitter_shortens_the_backoff_only(self):
        self.assertEqual(self.POLICY.decide(status(500), 1, jitter=0.75).delay, 0.375)
        self.assertEqual(self.POLICY.decide(status(429, 3.0), 1, jitter=0.75).delay, 3.0, "Retry-After is a floor")

    def test_huge_attempt_numbers_do_not_overflow(self):
        self.assertEqual(self.POLICY.decide(status(500), 10 ** 6, jitter=1.0).delay, 8.0)

    def test_jitter_comes_from_the_injected_random(self):
        policy = a.RetryPolicy(rng=random.Random(7))
        expected = random.Random(7).uniform(0.75, 1) * 0.5
        self.assertEqual(policy.decide(status(500), 1).delay, expected)


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


class AttemptsTest(unittest.TestCase):
    """``Attempts``: the attempts of one request counted, ``max_retries`` per call (shared by a
    split call's parts), the budget applied; the decisions as a table."""

    def test_table(self):
        R = a.Retry
        # max_retries, the errors of successive attempts, the actions decided
        table = [
            (2, [status(500), status(500), status(500)], [R.RETRY, R.RETRY, R.RAISE]),
            (0, [status(503)], [R.RAISE]),
            (1, [a.StaleConnectionError("closed", "u"), status(429)], [R.RESEND, R.RAISE]),
            (3, [status(429), status(400)], [R.RETRY, R.RAISE]),
        ]
        for max_retries, errors, actions in table:
            with self.subTest(max_retries=max_retries, errors=errors):
                attempts = a.RetryPolicy(max_retries, 0.5, 8.0, rng=random.Random(0)).attempts()
                self.assertEqual([attempts.failed(e).action for e in errors], actions)
                self.assertEqual(attempts.made, len(errors))

    def test_out_of_retries_keeps_the_mark_down(self):
        attempts = a.RetryPolicy(0).attempts()
        self.assertEqual(attempts.failed(status(503)), a.Retry(a.Retry.RAISE, True))
        attempts = a.RetryPolicy(1, 0, 0).attempts()
        for _ in range(2):
            attempts.failed(status(503))
        self.assertIn("(attempt 2 of at most 2)", str(attempts.gave_up(status(503))))
        self.assertNotIn("budget", str(attempts.gave_up(status(503))), "out of the call's retries, not the budget's")

    def test_a_split_calls_parts_share_its_retries(self):
        policy = a.RetryPolicy(2, rng=random.Random(0))
        left = [policy.max_retries]
        parts = [policy.attempts(left) for _ in range(8)]
        actions = [part.failed(status(429)).action for part in parts]
        self.assertEqual(actions, [a.Retry.RETRY] * 2 + [a.Retry.RAISE] * 6, "8 parts, 2 retries for the call")

    def test_the_budget_turns_a_retry_into_a_raise(self):
        clock = FakeClock()
        budget = a.RetryBudget(percent=0.0, min_per_second=0.1, ttl=10, clock=clock)  # a reserve of one retry
        policy = a.RetryPolicy(5, rng=random.Random(0), budget=budget)
        self.assertEqual(policy.attempts().failed(status(429)).action, a.Retry.RETRY)
        refused = policy.attempts()
        self.assertEqual(refused.failed(status(429)).action, a.Retry.RAISE)
        message = str(refused.gave_up(status(429)))
        self.assertIn("not retried: this manager's retry budget is spent; ATROPOS_SLURM_RETRY_BUDGET", message)
        self.assertNotIn("\n", message)
        self.assertEqual(policy.attempts().failed(a.StaleConnectionError("closed", "u")).action, a.Retry.RESEND,
                         "a resend on a fresh connection is not a retry of the server")


class RetryBudgetTest(unittest.TestCase):
    """Finagle's semantics on a fake clock: percent of the requests of the last ttl seconds,
    plus min_per_second * ttl."""

    def withdrawals(self, budget, clock, seconds, requests_per_second, tries_per_second):
        granted = 0
        for second in range(seconds):
            for i in range(requests_per_second):
                clock.now = second + i / requests_per_second
                budget.deposit()
            for _ in range(tries_per_second):
                granted += budget.try_withdraw()
        return granted

    def test_table(self):
        # percent, min_per_second, seconds, requests/s, retries tried/s -> retries granted
        table = [
            (0.2, 10, 10, 100, 1000, 100 + 200),  # the reserve once, and 20% of 1,000 requests
            (0.2, 10, 30, 100, 1000, 300 + 600),  # the reserve again every 10 s
            (0.0, 10, 10, 0, 1000, 100),
            (0.5, 0, 10, 10, 1000, 50),
            (0.2, 10, 10, 100, 5, 50),  # asking less than the budget: all granted
        ]
        for percent, floor, seconds, rate, tries, granted in table:
            with self.subTest(percent=percent, floor=floor, seconds=seconds, rate=rate, tries=tries):
                clock = FakeClock()
                budget = a.RetryBudget(percent, floor, clock=clock)
                self.assertEqual(self.withdrawals(budget, clock, seconds, rate, tries), granted)

    def test_retries_flow_again_once_the_window_passes(self):
        clock = FakeClock()
        budget = a.RetryBudget(0.2, 10, clock=clock)
        self.assertEqual(sum(budget.try_withdraw() for _ in range(500)), 100)
        clock.now = 5.0
        self.assertFalse(budget.try_withdraw(), "spent for 10 s")
        clock.now = 10.0
        self.assertTrue(budget.try_withdraw(), "the spent second is forgotten")


# =============================================================================================
# Manager knobs: keyword argument, else ATROPOS_SLURM_* variable, else default
# =============================================================================================


class ManagerKnobsTest(unittest.TestCase):
    DEFAULTS = dict(max_retries=2, retry_backoff=0.5, retry_backoff_max=8.0, no_server_timeout=60.0,
                    health_probe_interval=5.0, retry_budget=0.2, routing="prefix", routing_epsilon=0.25,
                    server_load_interval=0.0)

    def test_defaults_variables_and_explicit_arguments(self):
        self.assertEqual(dataclasses.asdict(a.manager_knobs({})), self.DEFAULTS)
        env = {"ATROPOS_SLURM_MAX_RETRIES": "5", "ATROPOS_SLURM_RETRY_BACKOFF": " 0.25 ",
               "ATROPOS_SLURM_RETRY_BACKOFF_MAX": "2", "ATROPOS_SLURM_NO_SERVER_TIMEOUT": "600",
               "ATROPOS_SLURM_HEALTH_PROBE_INTERVAL": "1e1", "ATROPOS_SLURM_RETRY_BUDGET": "0",
               "ATROPOS_SLURM_ROUTING": " prefix ", "ATROPOS_SLURM_ROUTING_EPSILON": "0.5",
               "ATROPOS_SLURM_SERVER_LOAD_INTERVAL": "2", "ATROPOS_SLURM_UNRELATED": "x"}
        self.assertEqual(dataclasses.asdict(a.manager_knobs(env)),
                         dict(max_retries=5, retry_backoff=0.25, retry_backoff_max=2.0, no_server_timeout=600.0,
                              health_probe_interval=10.0, retry_budget=0.0, routing="prefix", routing_epsilon=0.5,
                              server_load_interval=2.0))
        knobs = a.manager_knobs(env, max_retries=0, retry_backoff=None)
        self.assertEqual((knobs.max_retries, knobs.retry_backoff), (0, 0.25), "explicit arguments win; None is unset")
        self.assertEqual(a.manager_knobs({"ATROPOS_SLURM_MAX_RETRIES": " "}).max_retries, 2, "blank is unset")

    def test_bad_values_name_their_source(self):
        table = [
            ({"ATROPOS_SLURM_MAX_RETRIES": "two"}, {}, "ATROPOS_SLURM_MAX_RETRIES='two' is not an integer"),
            ({"ATROPOS_SLURM_MAX_RETRIES": "-1"}, {}, "ATROPOS_SLURM_MAX_RETRIES='-1' must be at least 0"),
            ({"ATROPOS_SLURM_RETRY_BACKOFF": "nan"}, {}, "ATROPOS_SLURM_RETRY_BACKOFF='nan' is not a finite number"),
            ({"ATROPOS_SLURM_RETRY_BUDGET": "-0.1"}, {}, "ATROPOS_SLURM_RETRY_BUDGET='-0.1' must be at least 0"),
            ({}, {"max_retries": True}, "max_retries=True is not an integer"),
            # a blank keyword argument was taken as "unset": the default, silently
            ({}, {"max_retries": ""}, "max_retries='' is not an integer"),
            ({}, {"routing": " "}, "routing=' ' must be one of 'prefix', 'round_robin'"),
            ({"ATROPOS_SLURM_RETRY_BACKOFF": "1"}, {"retry_backoff": ""}, "retry_backoff='' is not a finite number"),
            ({}, {"max_retries": -1}, "max_retries=-1 must be at least 0"),
            ({}, {"retry_backoff": -0.5}, "retry_backoff=-0.5 must be at least 0"),
            # issue 16: NaN and infinity were accepted for these four
            ({}, {"retry_backoff": math.nan}, "retry_backoff=nan is not a finite number"),
            ({}, {"retry_backoff_max": math.inf}, "retry_backoff_max=inf is not a finite number"),
            ({}, {"no_server_timeout": math.inf}, "no_server_timeout=inf is not a finite number"),
            ({}, {"health_probe_interval": math.nan}, "health_probe_interval=nan is not a finite number"),
            ({"ATROPOS_SLURM_NO_SERVER_TIMEOUT": "inf"}, {}, "ATROPOS_SLURM_NO_SERVER_TIMEOUT='inf' is not a finite"),
            ({"ATROPOS_SLURM_ROUTING": "sticky"}, {}, "ATROPOS_SLURM_ROUTING='sticky' must be one of 'prefix', "),
            ({"ATROPOS_SLURM_ROUTING_EPSILON": "-1"}, {}, "ATROPOS_SLURM_ROUTING_EPSILON='-1' must be at least 0"),
            # finite but overflowing: the budget's integer units, the routing bound's ceil()
            ({"ATROPOS_SLURM_RETRY_BUDGET": "1e306"}, {}, "ATROPOS_SLURM_RETRY_BUDGET='1e306' must be at most 1e+09"),
            ({"ATROPOS_SLURM_ROUTING_EPSILON": "1e308"}, {},
             "ATROPOS_SLURM_ROUTING_EPSILON='1e308' must be at most 1e+09"),
            ({}, {"no_server_timeout": 1e300}, "no_server_timeout=1e+300 must be at most 1e+09"),
            # 0 probed a down server in a busy loop: a whole core while it was down
            ({"ATROPOS_SLURM_HEALTH_PROBE_INTERVAL": "0"}, {}, "ATROPOS_SLURM_HEALTH_PROBE_INTERVAL='0' must be more than 0"),
            ({}, {"health_probe_interval": 0.0}, "health_probe_interval=0.0 must be more than 0"),
            ({"ATROPOS_SLURM_SERVER_LOAD_INTERVAL": "nan"}, {},
             "ATROPOS_SLURM_SERVER_LOAD_INTERVAL='nan' is not a finite number"),
            # the two variables a job set are named, not the keyword arguments it never wrote
            ({"ATROPOS_SLURM_ROUTING": "round_robin", "ATROPOS_SLURM_SERVER_LOAD_INTERVAL": "1"}, {},
             "ATROPOS_SLURM_SERVER_LOAD_INTERVAL=1 needs routing='prefix' (ATROPOS_SLURM_ROUTING='round_robin' reads "
             "no load)"),
            ({"ATROPOS_SLURM_SERVER_LOAD_INTERVAL": "1"}, {"routing": "round_robin"},
             "ATROPOS_SLURM_SERVER_LOAD_INTERVAL=1 needs routing='prefix' (routing='round_robin' reads no load)"),
        ]
        for env, given, message in table:
            with self.subTest(env=env, given=given):
                with self.assertRaises(a.ConfigError) as caught:
                    a.manager_knobs(env, **given)
                self.assertIn(message, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))

    def test_the_manager_reads_them(self):
        config = a.APIServerConfig(base_url="http://127.0.0.1:9/v1")
        env = {"ATROPOS_SLURM_MAX_RETRIES": "7", "ATROPOS_SLURM_NO_SERVER_TIMEOUT": "3",
               "ATROPOS_SLURM_HEALTH_PROBE_INTERVAL": "0.5", "ATROPOS_SLURM_RETRY_BACKOFF": "1"}
        with mock.patch.dict(os.environ, env):
            manager = a.ServerManager([config])
            self.assertEqual((manager.max_retries, manager.no_server_timeout, manager.health_probe_interval,
                              manager.retry_policy.backoff), (7, 3.0, 0.5, 1.0))
            self.assertEqual(a.ServerManager([config], max_retries=1).max_retries, 1)
            with mock.patch.dict(os.environ, {"ATROPOS_SLURM_RETRY_BACKOFF_MAX": "inf"}):
                with self.assertRaisesRegex(a.ConfigError, "ATROPOS_SLURM_RETRY_BACKOFF_MAX='inf'"):
                    a.ServerManager([config])


# =============================================================================================
# Request bodies: compact JSON from one C encoder
# =============================================================================================


class CompactJsonTest(unittest.TestCase):
    BODIES = [
        {"messages": [{"role": "user", "content": "h\u00e9llo \u2028 \"q\" \\ \ud83d\ude00"}], "max_tokens": 8},
        {"prompt": [1, 2, 3], "n": 10 ** 30, "x": [1.5, -0.0, float("inf"), None, True, False], "y": {}},
        {"nested": [[[{"k": []}]]], 1: "int key", None: "none key"},
        "a string", 3, [],
    ]

    def test_same_bytes_as_json_dumps_compact(self):
        for body in self.BODIES:
            self.assertEqual(a._json_compact(body), json.dumps(body, separators=(",", ":")))

    def test_an_error_leaves_nothing_behind_for_the_next_body(self):
        outer = [{"fine": 1}, object()]
        with self.assertRaises(TypeError):
            a._json_compact(outer)
        outer[1] = 2  # the same list again: its id must not be taken for a circular reference
        self.assertEqual(a._json_compact(outer), '[{"fine":1},2]')
        looped = []
        looped.append(looped)
        with self.assertRaisesRegex(ValueError, "Circular reference"):
            a._json_compact(looped)
        looped.clear()
        self.assertEqual(a._json_compact(looped), "[]")


# =============================================================================================
# Body framing
# =============================================================================================


def feed_all(framer, data, step):
    pieces = []
    for i in range(0, len(data), step):
        pieces += framer.feed(data[i:i + step])
    return b"".join(pieces)


class BodyFramingTest(unittest.TestCase):
    CHUNKED = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n"

    def test_chunked_in_any_split_of_the_bytes(self):
        for step in (1, 2, 3, 7, len(self.CHUNKED)):
            with self.subTest(step=step):
                framer = a.ChunkedBody(1 << 20)
                self.assertEqual(feed_all(framer, self.CHUNKED, step), b"Wikipedia in\r\n\r\nchunks.")
                self.assertTrue(framer.done)
                self.assertEqual(framer.extra, b"")

    def test_bytes_after_the_end_are_extra(self):
        framer = a.ChunkedBody(1 << 20)
        framer.feed(self.CHUNKED + b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(framer.done)
        self.assertEqual(framer.extra, b"HTTP/1.1 200 OK\r\n")
        length = a.LengthBody(3, 100)
        self.assertEqual(length.feed(b"abcdef"), [b"abc"])
        self.assertEqual(length.extra, b"def")
        length.feed(b"g")
        self.assertEqual(length.extra, b"defg", "bytes after the end keep counting as extra")

    def test_length_body(self):
        framer = a.LengthBody(5, 100)
        self.assertEqual(framer.feed(b"ab") + framer.feed(b"cde"), [b"ab", b"cde"])
        self.assertTrue(framer.done)
        self.assertTrue(a.LengthBody(0, 100).done, "an empty body is done before any byte")
        cut = a.LengthBody(5, 100)
        cut.feed(b"ab")
        self.assertFalse(cut.eof(), "closed before Content-Length bytes: incomplete")

    def test_until_close_body(self):
        framer = a.UntilCloseBody(100)
        self.assertEqual(framer.feed(b"abc"), [b"abc"])
        self.assertFalse(framer.done)
        self.assertTrue(framer.eof())
        self.assertTrue(framer.done)

    def test_limits(self):
        with self.assertRaises(a.ResponseTooLargeError):
            a.LengthBody(101, 100)
        with self.assertRaises(a.ResponseTooLargeError):
            a.ChunkedBody(100).feed(b"65\r\n")  # 0x65 = 101 bytes announced
        with self.assertRaises(a.ResponseTooLargeError):
            big = a.UntilCloseBody(100)
            big.feed(b"x" * 60)
            big.feed(b"x" * 60)
        with self.assertRaisesRegex(a.ProtocolError, "longer than"):
            a.ChunkedBody(1 << 20).feed(b"1" * (a.MAX_CHUNK_LINE_BYTES + 1))
        with self.assertRaisesRegex(a.ProtocolError, "trailers"):
            framer = a.ChunkedBody(1 << 20)
            framer.feed(b"0\r\n")
            for _ in range(a.MAX_HEADER_BYTES // 100 + 2):
                framer.feed(b"X: " + b"y" * 95 + b"\r\n")

    def test_malformed_chunks(self):
        for data in (b"zz\r\n", b"3\r\nabcXY", b"-1\r\n", b"\r\n"):
            with self.subTest(data=data), self.assertRaises(a.ProtocolError):
                a.ChunkedBody(1 << 20).feed(data)

    def test_cut_chunked_body_is_incomplete(self):
        framer = a.ChunkedBody(1 << 20)
        framer.feed(b"4\r\nWi")
        self.assertFalse(framer.eof())

    def test_framer_follows_the_head(self):
        def head(status=200, **kw):
            return a.ResponseHead(status, "", {}, True, kw.get("length"), kw.get("chunked", False))
        self.assertIsInstance(a.body_framer(head(chunked=True), 10), a.ChunkedBody)
        self.assertIsInstance(a.body_framer(head(length=3), 10), a.LengthBody)
        self.assertIsInstance(a.body_framer(head(), 10), a.UntilCloseBody)
        for raw in (b"HTTP/1.1 204 No Content\r\nContent-Length: 50", b"HTTP/1.1 304 Not Modified\r\n"
                    b"Transfer-Encoding: chunked", b"HTTP/1.1 101 Switching Protocols"):
            parsed = a.parse_response_head(raw)  # the framing is decided there, once
            self.assertEqual((parsed.content_length, parsed.has_body), (0, False), raw)
            self.assertTrue(a.body_framer(parsed, 10).done, f"{raw!r}: no body whatever it says")
        for encoding in ("Chunked", "gzip, chunked"):
            parsed = a.parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + encoding.encode())
            self.assertIsInstance(a.body_framer(parsed, 10), a.ChunkedBody, encoding)


# =============================================================================================
# Deadline queue, on a fake clock
# =============================================================================================


class FakeLoop:
    """``time()`` and ``call_at()`` of an event loop, with a clock the test moves."""

    def __init__(self):
        self.now = 0.0
        self.timers = []  # [when, callback, cancelled]

    def time(self):
        return self.now

    def call_at(self, when, callback):
        timer = Timer(when, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds):
        self.now += seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= self.now]
            if not due:
                return
            for t in due:
                self.timers.remove(t)
                t.callback()

    def armed(self):
        return [t for t in self.timers if not t.cancelled]


class Timer:
    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


class Entry:
    """A queue entry as ``_Deadline`` is one: ``when``, ``queued``, ``expire()``; ``cancel()`` removes it."""

    def __init__(self, queue, name, fired):
        self.queue, self.name, self.fired = queue, name, fired
        self.when, self.queued = None, False

    def expire(self):
        self.fired.append(self.name)

    def cancel(self):
        self.queue.remove(self)


class DeadlineQueueTest(unittest.TestCase):
    def setUp(self):
        self.loop = FakeLoop()
        self.queue = a._DeadlineQueue(self.loop, 10.0)
        self.fired = []

    def add(self, name):
        entry = Entry(self.queue, name, self.fired)
        self.queue.add(entry)
        return entry

    def test_one_timer_for_many_deadlines_fired_in_order(self):
        self.add("a")
        self.loop.advance(1)
        self.add("b")
        self.add("c")
        self.assertEqual(len(self.loop.armed()), 1, "one asyncio timer, armed for the oldest")
        self.loop.advance(9)
        self.assertEqual(self.fired, ["a"])
        self.assertEqual(len(self.loop.armed()), 1, "re-armed for the next one")
        self.loop.advance(1)
        self.assertEqual(self.fired, ["a", "b", "c"])
        self.assertEqual(self.loop.armed(), [], "nothing pending, no timer")

    def test_cancelled_deadlines_never_fire_and_leave_from_the_front(self):
        first, second = self.add("a"), self.add("b")
        first.cancel()
        self.assertEqual(len(self.queue._entries), 1, "the ended front entry left at once")
        second.cancel()
        self.assertEqual(len(self.queue._entries), 0)
        self.loop.advance(20)
        self.assertEqual(self.fired, [])
        self.add("c")
        self.assertEqual(len(self.loop.armed()), 1, "a queue that emptied arms a timer again")

    def test_cancel_twice_counts_once(self):
        entry = self.add("a")
        entry.cancel()
        entry.cancel()
        self.assertEqual(self.queue._live, 0)

    def test_a_long_entry_at_the_front_gets_the_rest_swept(self):
        self.add("long")  # stays live at the front
        entries = [self.add(i) for i in range(200)]
        for e in entries[:150]:
            e.cancel()
        self.assertLessEqual(len(self.queue._entries), 2 * self.queue._live,
                             "ended entries are swept out once they outnumber the live ones")
        self.assertEqual(self.queue._live, 51)
        self.loop.advance(10)
        self.assertEqual(self.fired, ["long"] + list(range(150, 200)))

    def test_entries_expire_the_queues_length_after_they_were_added(self):
        self.loop.advance(3)
        entry = self.add("a")
        self.assertEqual(entry.when, 13.0)
        self.loop.advance(9.5)
        self.assertEqual(self.fired, [])
        self.loop.advance(0.5)
        self.assertEqual(self.fired, ["a"])
        self.assertFalse(entry.queued, "an expired entry is no longer queued")

    def test_a_real_deadline_in_the_queue_times_out_its_task(self):
        async def main():
            queue = a._DeadlineQueue(asyncio.get_running_loop(), 0.05)
            with self.assertRaises(a.ServerTimeoutError) as caught:
                with a._Deadline(0.05, "too slow", "http://x", queue):
                    await asyncio.sleep(10)
            self.assertEqual(queue._live, 0)
            return str(caught.exception)

        self.assertIn("too slow", asyncio.run(main()))


if __name__ == "__main__":
    unittest.main()
