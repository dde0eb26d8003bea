"""WSI-Precision / WSI-Relevance: the arithmetic with a deterministic stub judge, malformed judge output, and an
end-to-end run through a tiny local Hugging Face model."""
import pytest

from topopack.model.judge import ClaimJudge, Judge, parse_claims, parse_scores
from topopack.model.scoring import score_records

PRED = "The tumor is a well differentiated hepatocellular carcinoma. It shows a trabecular pattern."
REF = "Moderately differentiated hepatocellular carcinoma with a trabecular pattern and no necrosis."


class Stub:
    """A judge that answers from a table: the claim-extraction prompt of a text -> its claims, the scoring
    prompt -> fixed lines. Records every prompt it gets."""

    def __init__(self, claims_of: dict, scores: str):
        self.claims_of, self.scores, self.prompts = claims_of, scores, []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if prompt.startswith("You split"):
            return next(v for k, v in self.claims_of.items() if k in prompt)
        return self.scores


def test_precision_is_the_mean_claim_score_of_the_prediction():
    stub = Stub({PRED: "- the tumor is hepatocellular carcinoma\n- it is well differentiated\n- trabecular"},
                "1. score: 1\n2. score: 0.3\n3. score: 0.7")
    r = ClaimJudge(stub).precision(PRED, REF)
    assert r.claims == ["the tumor is hepatocellular carcinoma", "it is well differentiated", "trabecular"]
    assert r.scores == [1.0, 0.3, 0.7] and r.score == pytest.approx(2 / 3) and r.malformed == 0
    # the claims come from the prediction, and are scored against the reference
    assert PRED in stub.prompts[0] and REF not in stub.prompts[0]
    assert REF in stub.prompts[1] and "2. it is well differentiated" in stub.prompts[1]


def test_relevance_is_the_mean_claim_score_of_the_reference():
    stub = Stub({REF: "- moderately differentiated\n- hepatocellular carcinoma\n- trabecular\n- no necrosis"},
                "score: 0.3\nscore: 1\nscore: 1\nscore: 0")  # unnumbered scores, taken in order
    r = ClaimJudge(stub).relevance(PRED, REF)
    assert len(r.claims) == 4 and r.scores == [0.3, 1.0, 1.0, 0.0]
    assert r.score == pytest.approx(2.3 / 4) and r.malformed == 0
    assert REF in stub.prompts[0] and PRED not in stub.prompts[0] and PRED in stub.prompts[1]


def test_malformed_scores_count_as_zero_and_are_counted():
    out = ("Sure! Here are the scores:\n"
           "2. score: 0.7\n"            # numbered out of order: still claim 2
           "1. score: 0.5\n"            # not one of 0, 0.3, 0.7, 1
           "garbage line 3. 1\n"
           "4. score: 1.0\n"            # 1.0 is 1
           "4. score: 0\n"              # a second score for claim 4 is ignored
           "9. score: 1\n")             # there is no claim 9; claims 3 and 5 get none
    scores, bad = parse_scores(out, 5)
    assert scores == [0.0, 0.7, 0.0, 1.0, 0.0] and bad == 3
    assert parse_scores("", 2) == ([0.0, 0.0], 2)


def test_claim_parsing_skips_garbage_lines():
    out = "Here are the claims:\n- tumor present\n\n* two nodules\n3. grade 2\n-\n- ...\nno bullet here"
    assert parse_claims(out) == ["tumor present", "two nodules", "grade 2"]
    assert parse_claims(out, max_claims=2) == ["tumor present", "two nodules"]


def test_no_claims_scores_zero_and_is_counted_unless_the_text_is_empty():
    stub = Stub({PRED: "I cannot find any claims.", "Text:\n\n": "- hallucinated"}, "1. score: 1")
    judge = ClaimJudge(stub)
    r = judge.precision(PRED, REF)
    assert (r.score, r.claims, r.malformed) == (0.0, [], 1)
    assert len(stub.prompts) == 1                                   # no scoring prompt without claims
    empty = judge.precision("  ", REF)                              # an empty answer makes no claim: no call
    assert (empty.score, empty.malformed) == (0.0, 0) and len(stub.prompts) == 1


def test_score_records_judges_open_questions_only():
    recs = [{"scale": "WSI", "type": "open", "answer": REF},
            {"scale": "WSI", "type": "single_choice", "answer": "yes", "options": ["yes", "no"]},
            {"scale": "ROI", "type": "open", "answer": REF}]
    stub = Stub({PRED: "- a\n- b", REF: "- c\n- d\n- e", "yes": "- x"}, "1. score: 1\n2. score: 0.3\n3. score: 0")
    per = ClaimJudge(stub, batch_size=1).score_records(recs, [PRED, "yes", PRED], bar=False)
    # precision: claims a, b scored 1, 0.3 -> 0.65; relevance: c, d, e scored 1, 0.3, 0 -> 1.3 / 3
    assert per[1] is None
    for p in (per[0], per[2]):
        assert p["wsi_precision"] == pytest.approx(0.65) and p["wsi_relevance"] == pytest.approx(1.3 / 3)
        assert p["malformed"] == 0
    m = score_records(recs, [PRED, "yes", PRED], per)
    assert m["scales"]["ROI"]["open_wsi_precision"] == pytest.approx(0.65)
    assert m["overall"]["open_wsi_relevance"] == pytest.approx(1.3 / 3) and m["overall"]["n_open_judged"] == 2


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    from topopack.model.llm import TinyLlamaConfig, build_default_llm, build_tokenizer, save_llm

    tok = build_tokenizer([PRED, REF, "claims score text reference answer model"])
    llm = build_default_llm(tok, TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, max_position_embeddings=1024))
    path = tmp_path_factory.mktemp("judge") / "tiny"
    save_llm(path, llm, tok)
    return path


def test_tiny_hf_judge_end_to_end(tiny_judge_dir, one_thread):
    judge = Judge(tiny_judge_dir, max_new_tokens=6, batch_size=2)
    seen = []
    generate_many = judge.generate_many
    judge.generate_many = lambda prompts: seen.extend(prompts) or generate_many(prompts)
    for r in (judge.precision(PRED, REF), judge.relevance(PRED, REF)):
        # a random model writes garbage: no claims (counted), or claims without valid scores (counted)
        assert 0.0 <= r.score <= 1.0 and r.malformed >= 1 and len(r.scores) == len(r.claims)
    assert seen[0].startswith("You split") and PRED in seen[0]                     # precision: claims of PRED
    assert any(p.startswith("You split") and REF in p for p in seen[1:])          # relevance: claims of REF
    outs = generate_many([seen[0], seen[0] + " more"])      # a padded batch of two
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert outs[0] == judge.generate(seen[0])                # left padding leaves the shorter prompt's answer alone


def test_tiny_hf_judge_scores_given_claims(tiny_judge_dir, one_thread):
    """Claims handed over, the scoring prompt goes through the model and its garbage is parsed and counted."""
    judge = Judge(tiny_judge_dir, max_new_tokens=6)
    seen, generate_many = [], judge.generate_many

    def claims_given(prompts):
        seen.extend(prompts)
        outs = iter(generate_many([p for p in prompts if not p.startswith("You split")]))
        return ["- tumor is carcinoma\n- trabecular" if p.startswith("You split") else next(outs) for p in prompts]

    judge.generate_many = claims_given
    r = judge.precision(PRED, REF)
    assert r.claims == ["tumor is carcinoma", "trabecular"] and len(r.scores) == 2
    assert 0.0 <= r.score <= 1.0 and r.malformed >= 1
    assert REF in seen[1] and "1. tumor is carcinoma\n2. trabecular" in seen[1]


def test_tiny_hf_judge_uses_the_chat_template(tiny_judge_dir, tmp_path, one_thread):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_judge_dir, local_files_only=True)
    tok.chat_template = ("{% for m in messages %}<s> user : {{ m['content'] }} </s>{% endfor %}"
                         "{% if add_generation_prompt %} assistant :{% endif %}")
    judge_dir = tmp_path / "templated"
    judge_dir.mkdir()
    for f in tiny_judge_dir.iterdir():
        (judge_dir / f.name).write_bytes(f.read_bytes())
    tok.save_pretrained(judge_dir)
    judge = Judge(judge_dir, max_new_tokens=4)
    text = judge.format_prompt("hello there")
    assert text.startswith("<s> user : hello there </s>") and text.endswith("assistant :")
    r = judge.precision(PRED, REF)
    assert 0.0 <= r.score <= 1.0 and r.malformed >= 1


def test_judge_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        Judge(tmp_path / "nowhere")
