"""model/prompt.py: conversations -> ids, with every answer and only the answers supervised."""
import pytest

from topopack.model.llm import build_tokenizer
from topopack.model.prompt import IGNORE, LLAVA_V1_SYSTEM, encode_conversation

TEXTS = ["Is there a tumor? yes no", "How many nodules? 2", LLAVA_V1_SYSTEM, "<|user|> <|assistant|> <|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised(after, labels):
    return after[labels != IGNORE].tolist()


def test_plain_single_turn_is_user_question_assistant_answer_eos(tok):
    before, after, labels = encode_conversation(tok, [("<image>\nIs there a tumor?", "yes")], "plain")
    assert before.tolist() == [tok.bos_token_id] + ids(tok, "USER:")
    assert after.tolist() == ids(tok, "Is there a tumor? ASSISTANT:") + ids(tok, " yes") + [tok.eos_token_id]
    assert supervised(after, labels) == ids(tok, " yes") + [tok.eos_token_id]


def test_multi_turn_supervises_every_answer_and_nothing_else(tok):
    turns = [("Is there a tumor?", "yes"), ("How many nodules?", "2")]
    before, after, labels = encode_conversation(tok, turns, "llava_v1")
    assert before.tolist()[:1] == [tok.bos_token_id] and tok.decode(before[1:]).startswith("a chat between")
    assert supervised(after, labels) == ids(tok, " yes") + [tok.eos_token_id] + ids(tok, " 2") + [tok.eos_token_id]
    text = tok.decode(after, skip_special_tokens=False)
    assert text.index("how many nodules") > text.index("yes")  # the second question follows the first answer
    # inference: the last answer is left out and the ids end with the assistant prompt
    _, gen_after, gen_labels = encode_conversation(tok, [turns[0], (turns[1][0], None)], "llava_v1")
    assert (gen_labels[-len(ids(tok, "How many nodules? ASSISTANT:")):] == IGNORE).all()
    assert gen_after.tolist() == after.tolist()[:len(gen_after)]


def test_chat_template_pieces_supervise_the_assistant_turns(tok):
    tok.chat_template = TEMPLATE
    try:
        before, after, labels = encode_conversation(tok, [("<image> Is there a tumor?", "yes"), ("How many?", "2")],
                                                    "chat_template")
    finally:
        tok.chat_template = None
    assert before.tolist() == ids(tok, "<|user|> ")
    got = supervised(after, labels)
    assert got == ids(tok, "yes <|end|> ") + ids(tok, "2 <|end|> ")


def test_bad_conversations_name_the_problem(tok):
    with pytest.raises(ValueError, match="one <image>"):
        encode_conversation(tok, [("<image> a <image>", "b")], "plain")
    with pytest.raises(ValueError, match="only the last turn"):
        encode_conversation(tok, [("a", None), ("b", "c")], "plain")
    with pytest.raises(ValueError, match="style"):
        encode_conversation(tok, [("a", "b")], "vicuna")
