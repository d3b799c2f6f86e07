from loratune import format_example
from loratune.prompt import format_target

SEED_PROMPT = """You are a support ticket classifier.

Given a customer message, output exactly one of the following labels:
- billing
- technical
- account
- shipping
- other

Output ONLY the label.

Customer message:
I was charged twice for my subscription."""


def test_default_prompt_is_exactly_the_seed_prompt():
    assert format_example("I was charged twice for my subscription.") == SEED_PROMPT


def test_task_and_labels_come_from_arguments():
    prompt = format_example("Where is my pizza?", labels=["late", "cold"], task="You route food orders.", input_name="order note")
    assert prompt.startswith("You route food orders.\n\nGiven a order note, output exactly one")
    assert "- late\n- cold\n" in prompt
    assert prompt.endswith("Order note:\nWhere is my pizza?")
    assert "billing" not in prompt


def test_text_is_stripped_but_inner_whitespace_kept():
    assert format_example("  two\nlines  ").endswith("Customer message:\ntwo\nlines")


def test_multi_label_prompt_asks_for_all_labels_in_order():
    prompt = format_example("x", multi_label=True)
    assert "output all of the following labels that apply, comma-separated, in the order listed:" in prompt
    assert "Output ONLY the labels." in prompt


def test_target_orders_multi_labels_like_the_label_set():
    assert format_target("billing") == "billing"
    assert format_target(("account", "billing")) == "billing, account"
