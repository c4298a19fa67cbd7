import dataclasses
import math

import pytest
import torch

from mpm.align.losses import (
    PRESETS,
    LossSettings,
    corrected_spans,
    is_degenerate,
    place_weights,
    preference_loss,
    preset,
    segment_weights,
    sequence_logps,
    token_logps,
)
from mpm.core.errors import ConfigError


def softplus_neg(x: float) -> float:
    """-log sigmoid(x), written out: log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def scores(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- the DPO formula ------------------------------------------------------------------------------------------


def test_dpo_loss_and_rewards_by_hand():
    # pair 0: policy gained 1 on chosen, lost 1 on rejected: margin 2. pair 1: margin (-5+4) - (-4+6) = -3.
    out = preference_loss(scores(-10, -5), scores(-12, -4), scores(-11, -4), scores(-11, -6), beta=0.1)
    assert out["losses"].tolist() == pytest.approx([softplus_neg(0.2), softplus_neg(-0.3)], abs=1e-12)
    assert out["chosen_rewards"].tolist() == pytest.approx([0.1, -0.1], abs=1e-12)
    assert out["rejected_rewards"].tolist() == pytest.approx([-0.1, 0.2], abs=1e-12)
    assert torch.equal(out["losses"], out["dpo_losses"])  # no SFT term by default


def test_losses_are_per_pair_not_a_mean():
    args = [scores(-10, -5, -7), scores(-12, -4, -7), scores(-11, -4, -6), scores(-11, -6, -9)]
    batched = preference_loss(*args, beta=0.5)["losses"]
    assert batched.shape == (3,)
    for i in range(3):
        alone = preference_loss(*[a[i : i + 1] for a in args], beta=0.5)["losses"]
        assert alone.item() == pytest.approx(batched[i].item(), abs=1e-12)


def test_gradient_flows_to_policy_only_and_matches_the_derivative():
    pc = scores(-10.0).requires_grad_()
    pr = scores(-12.0).requires_grad_()
    out = preference_loss(pc, pr, scores(-11), scores(-11), beta=0.1)
    out["losses"].sum().backward()
    # dL/dpc = -beta * sigmoid(-beta * m), m = 2; dL/dpr is its negative.
    expected = -0.1 / (1 + math.exp(0.2))
    assert pc.grad.item() == pytest.approx(expected, abs=1e-12)
    assert pr.grad.item() == pytest.approx(-expected, abs=1e-12)
    assert not out["chosen_rewards"].requires_grad and not out["rejected_rewards"].requires_grad


def test_sft_term_defaults_to_minus_the_chosen_score_and_takes_a_given_nll():
    args = [scores(-10), scores(-12), scores(-11), scores(-11)]
    dpo = softplus_neg(0.2)
    default = preference_loss(*args, beta=0.1, sft_weight=0.5)
    assert default["losses"].item() == pytest.approx(dpo + 0.5 * 10, abs=1e-12)
    assert default["dpo_losses"].item() == pytest.approx(dpo, abs=1e-12)
    given = preference_loss(*args, beta=0.1, chosen_nll=scores(2.5), sft_weight=0.5)
    assert given["losses"].item() == pytest.approx(dpo + 0.5 * 2.5, abs=1e-12)
    ignored = preference_loss(*args, beta=0.1, chosen_nll=scores(2.5), sft_weight=0.0)
    assert ignored["losses"].item() == pytest.approx(dpo, abs=1e-12)


def test_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        preference_loss(scores(-1), scores(-1), scores(-1), scores(-1), beta=0)
    with pytest.raises(ValueError, match="sft_weight"):
        preference_loss(scores(-1), scores(-1), scores(-1), scores(-1), beta=0.1, sft_weight=-1)
    with pytest.raises(ValueError, match="one shape"):
        preference_loss(scores(-1, -2), scores(-1), scores(-1), scores(-1), beta=0.1)


# ---- DDPO: weighted scores -------------------------------------------------------------------------------------

# One pair of responses, per-token log-probs written out. Rejected has 2 tokens, padded to 3; the padded slot holds
# -100 so a score that ignored the mask would be far off.
MASK = torch.tensor([[True, True, True], [True, True, False]])
POLICY = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -2.0, -100.0]], dtype=torch.float64)
REF = torch.tensor([[-1.0, -1.0, -1.0], [-1.5, -3.0, -100.0]], dtype=torch.float64)


def weights(gamma: float) -> torch.Tensor:
    # chosen: the middle token corrected; rejected: the first token corrected.
    return torch.tensor([[1.0, gamma, 1.0], [gamma, 1.0, 1.0]])


def ddpo(gamma: float, normalise: bool, beta: float) -> float:
    w = weights(gamma)
    pi = sequence_logps(POLICY, MASK, w, normalise=normalise)
    ref = sequence_logps(REF, MASK, w, normalise=normalise)
    return preference_loss(pi[:1], pi[1:], ref[:1], ref[1:], beta=beta)["losses"].item()


def test_ddpo_normalised_by_hand():
    # gamma 5: pi_c = (-1 - 10 - 3) / 7 = -2, ref_c = (-1 - 5 - 1) / 7 = -1,
    #          pi_r = (-10 - 2) / 6 = -2, ref_r = (-7.5 - 3) / 6 = -1.75; margin = -1 - (-0.25) = -0.75.
    assert sequence_logps(POLICY, MASK, weights(5.0), normalise=True).tolist() == pytest.approx([-2.0, -2.0])
    assert sequence_logps(REF, MASK, weights(5.0), normalise=True).tolist() == pytest.approx([-1.0, -1.75])
    assert ddpo(5.0, True, beta=0.5) == pytest.approx(softplus_neg(0.5 * -0.75), abs=1e-9)


def test_ddpo_unnormalised_by_hand():
    # gamma 1.1: pi_c = -1 - 2.2 - 3 = -6.2, ref_c = -3.1, pi_r = -2.2 - 2 = -4.2, ref_r = -1.65 - 3 = -4.65;
    # margin = -3.1 - 0.45 = -3.55.
    assert sequence_logps(POLICY, MASK, weights(1.1)).tolist() == pytest.approx([-6.2, -4.2])
    assert sequence_logps(REF, MASK, weights(1.1)).tolist() == pytest.approx([-3.1, -4.65])
    assert ddpo(1.1, False, beta=0.1) == pytest.approx(softplus_neg(0.1 * -3.55), abs=1e-6)


def test_normalise_off_is_the_sum_and_on_is_the_weighted_mean():
    assert sequence_logps(POLICY, MASK).tolist() == [-6.0, -4.0]
    assert sequence_logps(POLICY, MASK, normalise=True).tolist() == [-2.0, -2.0]
    # gamma 3: chosen (-1 - 6 - 3) / 5; rejected (-6 - 2) / 4; ref rejected (-4.5 - 3) / 4.
    assert sequence_logps(POLICY, MASK, weights(3.0), normalise=True).tolist() == pytest.approx([-2.0, -2.0])
    assert sequence_logps(REF, MASK, weights(3.0), normalise=True).tolist() == pytest.approx([-1.0, -1.875])


def test_gamma_one_unnormalised_is_plain_dpo():
    plain_pi, plain_ref = sequence_logps(POLICY, MASK), sequence_logps(REF, MASK)
    plain = preference_loss(plain_pi[:1], plain_pi[1:], plain_ref[:1], plain_ref[1:], beta=0.1)["losses"].item()
    assert ddpo(1.0, False, beta=0.1) == pytest.approx(plain, abs=1e-12)
    assert plain == pytest.approx(softplus_neg(0.1 * ((-6 + 3) - (-4 + 4.5))), abs=1e-12)
    assert ddpo(1.1, False, beta=0.1) != pytest.approx(plain, abs=1e-6)  # the weights do change it


def test_normalise_with_no_scored_token_is_an_error():
    with pytest.raises(ValueError, match="no scored tokens"):
        sequence_logps(POLICY, torch.zeros_like(MASK), normalise=True)


# ---- token log-probs --------------------------------------------------------------------------------------------


def test_token_logps_match_a_manual_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, 6, -100], [-100, -100, 0, 2, 5]])
    logps, mask = token_logps(logits, labels)
    assert logps.shape == mask.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])  # position t predicts token t + 1
            if target == -100:
                assert not mask[b, t] and logps[b, t] == 0
            else:
                manual = logits[b, t] - torch.logsumexp(logits[b, t], 0)
                assert mask[b, t] and logps[b, t].item() == pytest.approx(manual[target].item(), abs=1e-6)


def test_token_logps_are_float32_from_bf16_and_shapes_are_checked():
    logps, _ = token_logps(torch.randn(1, 4, 9).bfloat16(), torch.tensor([[-100, 1, 2, 3]]))
    assert logps.dtype == torch.float32
    with pytest.raises(ValueError, match="must agree"):
        token_logps(torch.randn(1, 4, 9), torch.tensor([[1, 2, 3]]))


def test_response_weights_line_up_with_the_shifted_response_tokens():
    prompt, chosen, rejected = [11, 12], [1, 2, 3, 4, 10, 5], [1, 2, 3, 4, 20, 5]
    input_ids = torch.tensor([prompt + chosen])
    labels = torch.tensor([[-100] * len(prompt) + chosen])
    torch.manual_seed(1)
    logits = torch.randn(1, input_ids.shape[1], 32, dtype=torch.float64)
    logps, mask = token_logps(logits, labels)
    chosen_w, _ = segment_weights(chosen, rejected, gamma=5.0)
    assert chosen_w.tolist() == [1, 1, 1, 1, 5, 5]  # "10" replaced "20"; the 1-token match "5" merges into it
    got = sequence_logps(logps, mask, place_weights([chosen_w], mask))
    manual = 0.0
    for k, token in enumerate(chosen):
        row = logits[0, len(prompt) - 1 + k]  # the logit that predicts response token k
        manual += float(chosen_w[k]) * (row - torch.logsumexp(row, 0))[token].item()
    assert got.item() == pytest.approx(manual, abs=1e-5)


def test_place_weights_checks_the_token_count():
    mask = torch.tensor([[False, True, True], [True, True, True]])
    placed = place_weights([torch.tensor([5.0, 1.0]), torch.tensor([1.0, 5.0, 5.0])], mask)
    assert placed.tolist() == [[1.0, 5.0, 1.0], [1.0, 5.0, 5.0]]
    with pytest.raises(ValueError, match="row 0: 3 token weights for 2 scored"):
        place_weights([torch.ones(3), torch.ones(3)], mask)
    with pytest.raises(ValueError, match="1 weight rows for a batch of 2"):
        place_weights([torch.ones(2)], mask)


# ---- corrected segments from the token diff ---------------------------------------------------------------------


def test_replacement_weights_both_sides():
    chosen, rejected = [1, 2, 3, 4, 7, 8, 5, 6, 9], [1, 2, 3, 4, 30, 5, 6, 9]
    assert corrected_spans(chosen, rejected) == [((4, 6), (4, 5))]
    cw, rw = segment_weights(chosen, rejected, gamma=5.0)
    assert cw.tolist() == [1, 1, 1, 1, 5, 5, 1, 1, 1]
    assert rw.tolist() == [1, 1, 1, 1, 5, 1, 1, 1]


def test_pure_insertion_and_deletion_keep_weight_one():
    shorter, longer = [1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 4, 5, 6]
    for chosen, rejected in [(shorter, longer), (longer, shorter)]:
        assert corrected_spans(chosen, rejected) == []
        cw, rw = segment_weights(chosen, rejected, gamma=5.0)
        assert cw.tolist() == [1.0] * len(chosen) and rw.tolist() == [1.0] * len(rejected)
        assert not is_degenerate(chosen, rejected)  # still a pair DPO learns from


def test_short_matches_merge_into_the_surrounding_correction():
    # the 1-token match "5" sits between two replaced tokens: one segment of 3 on each side.
    chosen, rejected = [1, 2, 3, 4, 10, 5, 11, 6, 7, 8, 9], [1, 2, 3, 4, 20, 5, 21, 6, 7, 8, 9]
    assert corrected_spans(chosen, rejected) == [((4, 7), (4, 7))]
    # with min_match 1 the "5" counts as unchanged and there are two segments
    assert corrected_spans(chosen, rejected, min_match=1) == [((4, 5), (4, 5)), ((6, 7), (6, 7))]


def test_a_short_match_turns_an_insertion_plus_deletion_into_a_replacement():
    # rejected = chosen with "7" wrapped as "8 7 9": alone that would be two insertions (weight 1), but "7" is a
    # 1-token match, so the whole gap is one replacement: chosen [7], rejected [8, 7, 9].
    chosen, rejected = [1, 2, 3, 7, 4, 5, 6], [1, 2, 3, 8, 7, 9, 4, 5, 6]
    assert corrected_spans(chosen, rejected) == [((3, 4), (3, 6))]
    cw, rw = segment_weights(torch.tensor(chosen), torch.tensor(rejected), gamma=2.0)  # tensors work too
    assert cw.tolist() == [1, 1, 1, 2, 1, 1, 1]
    assert rw.tolist() == [1, 1, 1, 2, 2, 2, 1, 1, 1]


def test_a_short_common_prefix_stays_unchanged_but_a_short_suffix_merges():
    # prefix "1" would join the prompt's match in the released code: not part of the correction.
    assert corrected_spans([1, 7, 2, 3, 4], [1, 8, 2, 3, 4]) == [((1, 2), (1, 2))]
    # a trailing 1-token match (an end token "0") after a replacement is part of it.
    assert corrected_spans([1, 2, 3, 4, 5, 7, 8, 0], [1, 2, 3, 4, 5, 9, 0]) == [((5, 8), (5, 7))]


def test_identical_responses_have_no_correction_and_are_degenerate():
    ids = [4, 8, 15, 16, 23, 42]
    assert corrected_spans(ids, ids) == []
    cw, rw = segment_weights(ids, list(ids), gamma=5.0)
    assert cw.tolist() == rw.tolist() == [1.0] * 6
    assert is_degenerate(ids, torch.tensor(ids))
    assert not is_degenerate(ids, ids[:-1] + [99])
    # why the caller drops them: equal scores give log 2 whatever the model
    same = scores(-3.0)
    assert preference_loss(same, same, scores(-4), scores(-4), beta=0.5)["losses"].item() == pytest.approx(
        math.log(2), abs=1e-12
    )


def test_completely_different_responses_are_one_replacement():
    assert corrected_spans([5, 6], [7, 8, 9]) == [((0, 2), (0, 3))]
    assert corrected_spans([], [1, 2]) == []


# ---- presets -----------------------------------------------------------------------------------------------------


def test_presets_hold_the_published_settings():
    assert preset("dpo") == LossSettings(beta=0.1, gamma=1.0, normalise=False)
    assert preset("rlhfv_paper") == LossSettings(beta=0.5, gamma=5.0, normalise=True)
    assert preset("rlhfv_released") == LossSettings(beta=0.1, gamma=1.1, normalise=False)
    assert not preset("dpo").token_weighted and preset("rlhfv_released").token_weighted
    assert all(s.sft_weight == 0.0 and s.min_match == 3 for s in PRESETS.values())


def test_unknown_preset_lists_the_names():
    with pytest.raises(ConfigError, match=r"unknown loss preset 'rlhf'.*dpo, rlhfv_paper, rlhfv_released"):
        preset("rlhf")


def test_settings_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("dpo").beta = 1.0
    with pytest.raises(ConfigError, match=r"`beta` must be > 0 but is 0"):
        LossSettings(beta=0)
    with pytest.raises(ConfigError, match=r"`gamma` must be > 0"):
        LossSettings(beta=0.1, gamma=-1)
    with pytest.raises(ConfigError, match=r"`sft_weight` must be >= 0"):
        LossSettings(beta=0.1, sft_weight=-0.5)
    with pytest.raises(ConfigError, match=r"`min_match` must be >= 1"):
        LossSettings(beta=0.1, min_match=0)
