"""String fields several API models share, with patterns every reader reads alike.

A pattern is read by three regex engines: pydantic's (Rust ``regex``, which
enforces it), JSON Schema's (ECMA-262, what the OpenAPI document means) and
Python's ``re`` (what clients' generators and validators often use, with or
without ``re.ASCII``). ``\\s`` is a different set in each: Rust's and ECMA's
include U+00A0 and U+2028, ASCII ``re`` does not; Python's includes
U+001C-U+001F, which ``str.strip`` strips and the others keep; ECMA's includes
U+FEFF. So no pattern here says ``\\s``: it spells out ``WHITESPACE``, the union
of all of them, and every reader refuses the same values.
"""

from __future__ import annotations

from typing import Annotated

import pydantic

#: Every character one of the engines (or ``str.strip``) calls whitespace, as a class body.
WHITESPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"

#: A display name: not only whitespace, no NUL, at most 200 characters as sent (what
#: the document's maxLength says; stripped first, 201 with a space before passed),
#: then stripped of surrounding whitespace.
Name = Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1,
        max_length=200,
        pattern=rf"^[^\x00]*[^\x00{WHITESPACE}][^\x00]*$",
    ),
    pydantic.AfterValidator(str.strip),
]

#: A Basic auth username: no colon (it ends the username), whitespace or NUL.
Username = Annotated[
    str,
    pydantic.StringConstraints(min_length=1, max_length=200, pattern=rf"^[^:\x00{WHITESPACE}]+$"),
]
