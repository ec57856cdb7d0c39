"""What a model is asked: a question as a prompt, plain (the question and an `Answer:` cue, `ANSWER_CUE`) or
chat (TRL's conversational form, with `DEFAULT_INSTRUCTION`: reason step by step, the final answer boxed), and the
text a prompt becomes through a tokenizer's chat template (`prompt_text`). Reading the answer back out of a
completion is `mtprl.data.scoring.extract_answer`."""

from __future__ import annotations

ANSWER_CUE = "\nAnswer: "
PROMPT_FORMATS = ("auto", "chat", "plain")
# Appended to every chat question that does not carry its own answer-format instruction (DAPO rows do).
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(question: str) -> str:
    return question.strip() + ANSWER_CUE


def resolve_prompt_format(prompt_format: str, tokenizer=None) -> str:
    """auto: chat for a tokenizer with a chat template, plain otherwise (the tiny preset's char tokenizer)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return prompt_format


def build_prompt(question: str, prompt_format: str = "plain", system_prompt: str | None = None,
                 instruction: str | None = DEFAULT_INSTRUCTION):
    """plain: `question + "\nAnswer: "`; chat: TRL's conversational form `[{"role": "user", ...}]` (with an
    optional system message), the instruction appended to the question."""
    if prompt_format == "plain":
        return format_prompt(question)
    content = question.strip() + (f"\n\n{instruction}" if instruction else "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def prompt_text(tokenizer, prompt) -> str:
    """The text a model is given for a prompt: chat prompts through the tokenizer's chat template."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt

