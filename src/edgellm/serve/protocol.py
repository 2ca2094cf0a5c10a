"""The OpenAI request bodies the server takes (pydantic models: a field of the wrong type or out of
range is a 400 naming the field) and the response objects it writes.

Fields that change what is generated and that edgellm cannot honour (n > 1, logprobs, tools,
echo) are refused rather than ignored; other unknown fields are ignored, as OpenAI's own clients
send some that do not matter here (user, metadata, store)."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "ValidationError", "describe", "usage"]

Finite = Annotated[float, Field(allow_inf_nan=False)]


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _unsupported(what: str) -> AfterValidator:
    """A field that would change the answer in a way edgellm does not offer: refused when set."""
    def check(value):
        if value not in (None, False, 0, []):
            raise ValueError(f"{what} not supported")
        return value

    return AfterValidator(check)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = "answer"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class LoraChoice(_Strict):
    """llama.cpp's per-request adapter: an index into GET /lora-adapters and its scale."""
    id: int = Field(ge=0)
    scale: Finite = 1.0


class _Common(_Strict):
    model: str | None = None  # the served model, or one of its LoRA adapters by name (as /v1/models lists them)
    lora: list[LoraChoice] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite = Field(1.0, ge=0.0, le=2.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # llama.cpp's extension: 0 = no limit
    ignore_eos: bool = False  # llama.cpp's extension: generate max_tokens tokens
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one answer per request
    logprobs: Annotated[bool | int | None, _unsupported("log probabilities are")] = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 16 stop strings of at most 256 characters")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def schema(self) -> tuple[bool, dict | None]:
        """(constrained to JSON, the schema or None for any object)."""
        f = self.response_format
        if f is None or f.type == "text":
            return False, None
        if f.type == "json_schema":
            if f.json_schema is None or f.json_schema.schema_ is None:
                raise ApiError(400, "response_format json_schema needs json_schema.schema", "response_format")
            return True, f.json_schema.schema_
        return True, None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl

    def data(self, where: str) -> bytes:
        """The image's bytes: only data: URLs (base64), as llama.cpp's server takes them; the
        server fetches nothing from the network."""
        url = self.image_url.url
        head, comma, payload = url.partition(",")
        if not url.startswith("data:") or not comma:
            raise ApiError(400, f"{where}: only data: URLs are accepted (data:image/png;base64,...); the server "
                                f"does not fetch {url[:40]!r}", where)
        if not head.endswith(";base64"):
            raise ApiError(400, f"{where}: the data: URL must be base64 (data:image/...;base64,...)", where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: the image is not valid base64 ({e})", where) from None


class OtherPart(_Strict):
    type: Literal["input_audio", "file", "refusal"]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart | OtherPart] | None = None

    def template_content(self, index: int, images: list[bytes] | None) -> str | list[dict]:
        """The content as a chat template reads it: text, or with images (a vision-language build
        passes `images`, which collects their bytes) the parts {"type": "image"} and {"type":
        "text"} in their order."""
        if not isinstance(self.content, list):
            return self.content or ""
        parts = []
        for k, part in enumerate(self.content):
            if isinstance(part, ImagePart) and images is not None:
                images.append(part.data(f"messages.{index}.content.{k}"))
                parts.append({"type": "image"})
            elif isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                what = "text and images" if images is not None else "text"
                raise ApiError(400, f"this model reads {what} only; a content part of type {part.type} cannot be used",
                               "messages")
        if all(part["type"] == "text" for part in parts):
            return "".join(part["text"] for part in parts)
        return parts


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Annotated[list | None, _unsupported("tool calls are")] = None

    def chat_messages(self, vision: bool = False) -> tuple[list[dict], list[bytes]]:
        """The messages for the chat template, and the images they carry (a vision build only)."""
        images: list[bytes] | None = [] if vision else None
        # "developer" is OpenAI's newer name for the system role; chat templates know "system"
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.template_content(i, images)}
                    for i, m in enumerate(self.messages)]
        return messages, images or []

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: Annotated[bool, _unsupported("echo is")] = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    @property
    def answer_limit(self) -> int | None:
        return self.max_tokens


_BRANCH_TAGS = {"str", "int", "bool", "float", "list", "dict", "none", "TextPart", "ImagePart", "OtherPart"}


def describe(error: ValidationError) -> ApiError:
    """The first problem of a pydantic error, as one line naming the field."""
    first = error.errors()[0]
    # the location without pydantic's union-branch tags ("str", "list[TextPart]", "function-after[...]")
    where = ".".join(str(p) for p in first["loc"]
                     if isinstance(p, int) or not ("[" in p or "-" in p or p in _BRANCH_TAGS))
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{where}: {message}" if where else message, where or None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
