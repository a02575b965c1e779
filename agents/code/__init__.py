"""Code completion: FIM prompts with repo context (`fim`), stop rules (`postprocess`), keystroke
supersede/debounce (`debounce`), and `CodeAgent`, which drives any `app.backend.Backend` with them.

The server's WebSocket and OpenAI APIs use the same prompt building and stop rules (through
`app.prompting` and the backends), so a completion is the same whichever surface asked for it.
"""

from .agent import CodeAgent, CodeConfig, code_request, split_at_marker
from .debounce import Supersede
from .fim import Budget, prompt_ids
from .languages import Language, language_for
from .postprocess import Completion, Cursor, for_request, trim_overlap

__all__ = ["Budget", "CodeAgent", "CodeConfig", "Completion", "Cursor", "Language", "Supersede", "code_request",
           "for_request", "language_for", "prompt_ids", "split_at_marker", "trim_overlap"]
