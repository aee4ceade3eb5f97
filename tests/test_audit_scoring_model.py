"""log p(target) from a ScoringModel (memorize/audit/scoring_model.py) against log_softmax of the model's own logits
in float64, through the output head and through the whole model's logits; what it says of itself, against the
model it holds (a tiny GPT-2 built here, nothing downloaded)."""

import copy
import dataclasses

import pytest
import torch

from memk.bench.audit_demo import char_tokenizer, new_gpt2
from memk.memorize.audit.models import scoring_model_from
from memk.memorize.audit.scoring_model import token_logprobs

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[0, 3, 4, 5, 6, 0], [0, 7, 8, 0, 0, 0]])  # the second row is 3 tokens, padded
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
ROWS = torch.tensor([0, 1, 2, 3, 4, 6, 7])  # flat positions: the first row's first five, the second's first two
TARGETS = torch.tensor([3, 4, 5, 6, 0, 7, 8])  # the token after each


@pytest.fixture(scope="module")
def held():
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    module = new_gpt2(len(tokenizer), context=16, seed=2, d_model=16, layers=1, heads=2)
    return scoring_model_from(module, tokenizer, "tiny"), module, tokenizer


@pytest.mark.parametrize("path", ["output head", "whole model's logits"])
def test_token_logprobs_and_moments_are_the_models_log_softmax_in_float64(held, path):
    model, module, _ = held
    assert model.head_weight is not None  # GPT-2's head gives its logits: the head path is the default
    if path == "whole model's logits":
        model = dataclasses.replace(model, head_weight=None, head_bias=None)
    with torch.no_grad():
        logits = copy.deepcopy(module).double()(input_ids=IDS, attention_mask=MASK).logits
    logp_all = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[ROWS], -1)
    want = logp_all[torch.arange(len(ROWS)), TARGETS]
    p = logp_all.exp()
    mean = (p * logp_all).sum(-1)
    std = (p * (logp_all - mean[:, None]) ** 2).sum(-1).sqrt()
    with torch.no_grad():
        logp, got_mean, got_std = token_logprobs(model, IDS, MASK, ROWS, TARGETS, moments=True)
        plain = token_logprobs(model, IDS, MASK, ROWS, TARGETS, moments=False)
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_std.double(), std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, logp)


def test_a_scoring_model_describes_the_model_it_holds(held):
    model, module, tokenizer = held
    assert model.describe() == {"spec": "tiny", "kind": "huggingface", "start_token": "<s>", "start_id": 0,
                                "context": 16, "parameters": sum(p.numel() for p in module.parameters()),
                                "dtype": "float32", "vocab_size": len(tokenizer)}
    assert model.device == torch.device("cpu") and model.head_dtype == torch.float32
    assert model.encode(["ab a", ""]) == [[2, 3, 18, 2], []]  # one token a character: a=2, b=3, space=18
