"""The shop's FAQ as a chat model: a custom model family for flask-ai-gateway, in its own package.

The catalogue names it like any other family:

    - name: shop-faq
      backend: faq
      params:
        answers:
          shipping: "Orders ship within two working days."
          returns: "You can return any item within 30 days."
        fallback: "Sorry, I can only answer questions about shipping and returns."

The reply is the answer whose topic word appears in the last user message (the first topic in
the catalogue's order wins), streamed word by word. Because it is a Backend, the gateway's
authentication, rate limits, policies, quotas, audit and metrics apply to it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import marshmallow as ma

from app.inference.backends import Backend, ModelSpec
from app.inference.backends.base import ChatChunk, ChatRequest

WORD = re.compile(r"\w+")


class FaqParams(ma.Schema):
    """Checked by the gateway when a version is registered, and again before it loads."""

    answers = ma.fields.Dict(
        keys=ma.fields.String(validate=ma.validate.Length(min=1)),
        values=ma.fields.String(validate=ma.validate.Length(min=1)),
        required=True,
        validate=ma.validate.Length(min=1),
    )
    fallback = ma.fields.String()


class FaqBackend(Backend):
    family = "faq"
    params_schema = FaqParams
    capabilities = frozenset({"chat"})
    cpu_bound = False  # a dictionary lookup: no need for a thread
    thread_safe = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.answers: dict[str, str] = {}
        self.fallback = ""

    def load(self) -> None:
        self.answers = {topic.lower(): text for topic, text in self.spec.params["answers"].items()}
        self.fallback = str(self.spec.params.get("fallback", "I don't know."))

    def context_length(self) -> int:
        return 4096

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(len(WORD.findall(str(m.get("content") or ""))) for m in messages)

    def answer(self, messages: list[dict[str, str]]) -> str:
        question = next((str(m.get("content") or "") for m in reversed(messages) if m["role"] == "user"), "")
        words = {w.lower() for w in WORD.findall(question)}
        return next((text for topic, text in self.answers.items() if topic in words), self.fallback)

    def chat_stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        words = self.answer(request.messages).split(" ")
        limit = request.max_tokens or len(words)
        for i, word in enumerate(words[:limit]):
            yield ChatChunk(text=word if i == 0 else " " + word)
        yield ChatChunk(
            finish_reason="stop" if limit >= len(words) else "length",
            prompt_tokens=self.count_prompt_tokens(request.messages),
            completion_tokens=min(limit, len(words)),
        )
