"""Response scores, pair selection and the length sweep, on hand-made scores and lengths."""

from __future__ import annotations

import pytest

from mpm.align import labeler
from mpm.align.pairs import (
    ACCEPT_ABOVE,
    RankedPair,
    ScoredResponse,
    balance_lengths,
    candidate_pairs,
    claim_accepted,
    filter_by_length,
    sample_pairs,
    score_response,
)


def resp(inst: str, rid: str, score: int | None, text: str = "") -> ScoredResponse:
    return ScoredResponse(inst, rid, text or f"answer {rid}", score)


def pair(chosen_words: int, rejected_words: int, tag: str = "") -> RankedPair:
    # distinct texts of the given word counts
    c = ScoredResponse("i", f"c{tag}", " ".join(["c"] * chosen_words), 0)
    r = ScoredResponse("i", f"r{tag}", " ".join(["r"] * rejected_words), -1)
    return RankedPair("i", c, r)


def test_claim_verdict_tie_is_rejected():
    # the labeler's normalised score P(yes) / (P(yes) + P(no))
    assert claim_accepted(0.6)
    assert not claim_accepted(0.4)
    assert not claim_accepted(0.5)  # RLAIF-V: yes > no, strictly
    assert claim_accepted(0.5 + 1e-9) and ACCEPT_ABOVE == 0.5


def test_the_threshold_is_defined_once():
    assert "ACCEPT_ABOVE" not in vars(labeler)  # one definition, in pairs.py: the labeler returns scores only


def test_score_is_minus_rejected_claims():
    assert score_response([True, True, True]) == 0
    assert score_response([True, False, False]) == -2
    assert score_response([claim_accepted(s) for s in (0.9, 0.5, 0.2)]) == -2
    assert score_response([]) is None


def test_gap_rule_and_orientation():
    got, unscored = candidate_pairs([resp("q", "a", -1), resp("q", "b", 0), resp("q", "c", -1), resp("q", "d", -3)])
    assert unscored == 0
    as_ids = [(p.chosen.response_id, p.rejected.response_id) for p in got]
    # combinations order: (a,b) (a,c) (a,d) (b,c) (b,d) (c,d); (a,c) ties and is left out
    assert as_ids == [("b", "a"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(p.chosen.score > p.rejected.score for p in got)
    bigger, _ = candidate_pairs([resp("q", "a", -1), resp("q", "b", 0), resp("q", "d", -3)], min_gap=2)
    assert [(p.chosen.response_id, p.rejected.response_id) for p in bigger] == [("a", "d"), ("b", "d")]


def test_equal_scores_and_other_instructions_never_pair():
    same = [resp("q1", str(i), -2) for i in range(5)]
    assert candidate_pairs(same) == ([], 0)
    # different scores, but for different instructions
    assert candidate_pairs([resp("q1", "a", 0), resp("q2", "b", -3)]) == ([], 0)
    with pytest.raises(ValueError, match="min_gap must be >= 1"):
        candidate_pairs(same, min_gap=0)


def test_responses_without_claims_are_left_out_and_counted():
    responses = [resp("q", "a", score_response([])), resp("q", "b", 0), resp("q", "c", -2), resp("r", "d", None)]
    pairs, unscored = candidate_pairs(responses)
    assert [(p.chosen.response_id, p.rejected.response_id) for p in pairs] == [("b", "c")]
    assert unscored == 2
    assert candidate_pairs([resp("q", "a", None), resp("q", "b", None)]) == ([], 2)


def test_at_most_two_pairs_per_instruction():
    responses = [resp("q1", str(i), -i) for i in range(5)] + [resp("q2", "a", 0), resp("q2", "b", -1)]
    pairs, _ = candidate_pairs(responses)
    assert len(pairs) == 10 + 1
    got = sample_pairs(pairs, seed=3)
    by = {k: [p for p in got if p.instruction_id == k] for k in ("q1", "q2")}
    assert len(by["q1"]) == 2 and len(set(by["q1"])) == 2 and set(by["q1"]) <= set(pairs[:10])
    assert by["q2"] == [pairs[10]]  # fewer than the cap: all kept
    assert sample_pairs(pairs, seed=3) == got  # seeded: a rerun picks the same pairs
    draws = {tuple(sample_pairs(pairs, seed=s)) for s in range(20)}
    assert len(draws) > 1  # a random draw, not always the first two
    assert len(sample_pairs(pairs, max_per_instruction=1)) == 2


def test_filter_by_length():
    pairs = [pair(5, 10, "a"), pair(9, 10, "b"), pair(12, 10, "c")]
    # shortening (10-5)/10 = 0.5, (10-9)/10 = 0.1, (10-12)/10 = -0.2
    assert filter_by_length(pairs, 0.0) == [pairs[2]]
    assert filter_by_length(pairs, 0.1) == pairs[1:]
    assert filter_by_length(pairs, 0.5) == pairs
    same = RankedPair("i", resp("i", "x", 0, "same text"), resp("i", "y", -1, " same text "))
    assert filter_by_length([same], 0.9) == []  # identical answers are no preference
    empty_rejected = RankedPair("i", resp("i", "x", 0, "a b"), ScoredResponse("i", "y", "", -1))
    assert filter_by_length([empty_rejected], 0.0) == [empty_rejected]


def test_length_sweep_picks_the_most_balanced_ratio():
    # chosen shorter by 50% / 20%, and two pairs where chosen is longer.
    pairs = [pair(5, 10, "a"), pair(8, 10, "b"), pair(11, 10, "c"), pair(12, 10, "d")]
    kept, sweep = balance_lengths(pairs)
    # r < 0.2: keep c, d -> means 11.5 vs 10, gap 0.15
    # 0.2 <= r < 0.5: keep b, c, d -> 31/3 vs 10, gap 0.0333...
    # r >= 0.5: keep all -> 9 vs 10, gap 0.1
    assert sweep.ratio == pytest.approx(0.2)
    assert kept == pairs[1:]
    assert (sweep.kept, sweep.dropped) == (3, 1)
    assert sweep.mean_chosen_len == pytest.approx(31 / 3)
    assert sweep.mean_rejected_len == pytest.approx(10)
    assert sweep.gap == pytest.approx(1 / 30)


def test_length_sweep_tie_takes_the_smallest_ratio_and_custom_length():
    # Every pair has chosen == rejected length: gap 0 at r = 0 already.
    pairs = [pair(4, 4, "a"), pair(6, 6, "b")]
    kept, sweep = balance_lengths(pairs)
    assert (sweep.ratio, kept, sweep.gap) == (0.0, pairs, 0.0)
    # CJK: count characters, not whitespace words.
    zh = RankedPair("i", resp("i", "c", 0, "猫是黑色的"), resp("i", "r", -1, "猫是黑色的而且很大很大很大"))
    kept, sweep = balance_lengths([zh, pair(13, 5)], length=len)
    assert sweep.ratio == pytest.approx(0.62)  # (13-5)/13 = 0.615... -> the first r that keeps zh
    assert kept == [zh, pair(13, 5)]


def test_length_sweep_with_nothing_to_keep():
    kept, sweep = balance_lengths([])
    assert kept == [] and sweep.kept == 0 and sweep.gap == float("inf")
