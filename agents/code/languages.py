"""What the completion stop rules need to know about a programming language.

A language is picked from the editor's language id (LSP `languageId`: "python", "typescriptreact",
...) or else from the file name's extension; anything unknown gets `GENERIC` (indentation and
bracket rules only, no keywords).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Language:
    name: str
    # Lines starting with one of these, at column 0, begin a new top-level definition. Words must be
    # followed by a non-identifier character; other entries ("@", "#[") are plain prefixes.
    top_level: tuple[str, ...] = ()
    # At the indentation of a block opener, these continue its statement instead of ending it
    # (`else:` after an `if x:` body; `} else {` is covered by the closer rule).
    continuations: tuple[str, ...] = ()
    openers: str = "{(["  # a line ending with one opens a block
    closers: str = "})]"

    @cached_property
    def _patterns(self) -> dict[str, tuple[tuple[str, ...], re.Pattern]]:
        return {"top_level": (self.top_level, _starts(self.top_level)),
                "continuations": (self.continuations, _starts(self.continuations))}

    def starts(self, kind: str, code: str, complete: bool = True) -> bool | None:
        """Whether `code` (a line without its indentation) starts with one of the `kind` entries
        ("top_level" or "continuations"); None while an incomplete line may still turn out either
        way ("de" may become "def", "def" may become "default")."""
        words, pattern = self._patterns[kind]
        code = re.sub(r"\s+", " ", code)
        m = pattern.match(code)
        if m:
            return True if complete or m.end() < len(code) or not _WORD_END.match(code[-1]) else None
        return None if not complete and any(w.startswith(code) for w in words) else False


_WORD_END = re.compile(r"[\w$]")


def _starts(entries: tuple[str, ...]) -> re.Pattern:
    alts = [re.escape(e).replace(r"\ ", r"\s+") + (r"(?![\w$])" if e[-1].isalnum() else "") for e in entries]
    return re.compile("|".join(alts) or r"(?!)")


PYTHON = Language(
    "python",
    top_level=("def", "class", "async def", "@", "if __name__"),
    continuations=("elif", "else", "except", "finally"),
    openers=":{([",
)
_JS_DEFS = ("function", "async function", "class", "export", "interface", "type", "enum", "declare",
            "abstract class", "namespace")
JAVASCRIPT = Language("javascript", top_level=_JS_DEFS, continuations=("else", "catch", "finally"))
GO = Language("go", top_level=("func", "type", "var", "const", "import", "package"), continuations=("else",))
RUST = Language("rust", top_level=("fn", "pub", "impl", "struct", "enum", "trait", "mod", "use", "const", "static",
                                   "type", "unsafe", "extern", "async fn", "macro_rules!", "#["),
                continuations=("else",))
C = Language("c", top_level=("#", "typedef", "struct", "enum", "union", "static", "extern", "void", "int", "char",
                             "unsigned", "long", "short", "float", "double", "bool", "const", "class",
                             "namespace", "template", "inline"),
             continuations=("else",))
JAVA = Language("java", top_level=("public", "private", "protected", "class", "interface", "enum", "record",
                                   "abstract", "final", "static", "@", "import", "package"),
                continuations=("else", "catch", "finally"))
CSHARP = Language("csharp", top_level=("public", "private", "protected", "internal", "class", "interface",
                                       "enum", "record", "struct", "namespace", "using", "static", "[", "abstract"),
                  continuations=("else", "catch", "finally"))
GENERIC = Language("generic")

_BY_ID = {
    "python": PYTHON, "py": PYTHON,
    "javascript": JAVASCRIPT, "javascriptreact": JAVASCRIPT, "typescript": JAVASCRIPT,
    "typescriptreact": JAVASCRIPT, "js": JAVASCRIPT, "ts": JAVASCRIPT, "jsx": JAVASCRIPT, "tsx": JAVASCRIPT,
    "go": GO, "golang": GO,
    "rust": RUST, "rs": RUST,
    "c": C, "cpp": C, "c++": C, "objective-c": C, "cuda": C,
    "java": JAVA,
    "csharp": CSHARP, "c#": CSHARP, "cs": CSHARP,
}
_BY_EXT = {
    ".py": PYTHON, ".pyi": PYTHON,
    ".js": JAVASCRIPT, ".mjs": JAVASCRIPT, ".cjs": JAVASCRIPT, ".jsx": JAVASCRIPT, ".ts": JAVASCRIPT,
    ".tsx": JAVASCRIPT, ".mts": JAVASCRIPT,
    ".go": GO, ".rs": RUST,
    ".c": C, ".h": C, ".cc": C, ".cpp": C, ".cxx": C, ".hpp": C, ".hh": C, ".cu": C, ".m": C,
    ".java": JAVA, ".cs": CSHARP,
}


def language_for(language: str | None = None, filename: str | None = None) -> Language:
    if language and language.lower() in _BY_ID:
        return _BY_ID[language.lower()]
    if filename:
        return _BY_EXT.get(PurePosixPath(filename.replace("\\", "/")).suffix.lower(), GENERIC)
    return GENERIC
