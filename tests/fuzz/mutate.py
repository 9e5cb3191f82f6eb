"""The seeded mutator: every change a damaged or hostile file can bring, drawn from one ``random.Random``.

Three layers, each a list of operations the targets combine:

- :func:`mutate_bytes`: bit flips, interesting bytes, an integer field (1/2/4/8 bytes, either byte order)
  set to a huge, negative or boundary value (the "length field set to huge" of the contract; a target can
  point at the offsets of its length fields with ``hot``), truncation, deleted / duplicated / inserted
  chunks, splicing with another seed, garbage appended;
- :func:`mutate_text`: the same on lines and tokens of a text file: numbers replaced by extreme or
  non-numbers, fields dropped or added, lines deleted, repeated or swapped, a separator changed, a
  non-UTF-8 byte, a NUL, an overlong line, a path that leaves the folder;
- :func:`mutate_tree`: wrong types in parsed data (YAML, JSON, pickles, checkpoints): a value replaced
  by one of another type, a key dropped or added, a list emptied or grown, a deep or aliased structure.

Everything is a pure function of the rng and the inputs, so a campaign's seed reproduces every input.
"""
from __future__ import annotations

import math
import random
import struct
from typing import Any, Callable, List, Optional, Sequence

#: integers that break length and count fields: boundaries of every width, signs, and "just too big"
INTERESTING_INTS = (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 1023, 1024, 4095, 4096,
                    0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x1FFFFFFF, 0x20000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                    0x100000000, 10 ** 9, 10 ** 12, 2 ** 62, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, -1, -2, -128,
                    -32768, -(2 ** 31), -(2 ** 63))
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x0D, 0x20, 0x22, 0x27, 0x2C, 0x2E, 0x2F, 0x3A, 0x5C)
#: tokens that replace a number or a name in a text file
INTERESTING_TOKENS = ("0", "-1", "1", "-0", "2", "65536", "4294967296", "99999999999999999999999999", "-99999999999999",
                      "1e308", "1e309", "-1e309", "nan", "NaN", "inf", "-inf", "1.5", "0x10", "1_000", "", " ", "\t",
                      "abc", "None", "null", "true", "[]", "{}", "'", '"', "#", ",", "../../outside", "/etc/passwd",
                      "a/../../b", "~", "\u00e9t\u00e9", "\u202e", "\U0001f600", "a" * 300, "%s%n", "\\", "*", "?")
LINE_BREAKS = ("\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\u2028", "\x85")


def _choice(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[rng.randrange(len(seq))]


# ----------------------------------------------------------------------------------------- bytes
def _pack_int(rng: random.Random, value: int, width: int) -> bytes:
    value &= (1 << (8 * width)) - 1
    return value.to_bytes(width, _choice(rng, ("little", "big")))


def mutate_bytes(rng: random.Random, data: bytes, others: Sequence[bytes] = (), hot: Sequence[int] = (),
                 rounds: Optional[int] = None) -> bytes:
    """``data`` with 1..4 (or ``rounds``) byte-level operations applied (see the module docstring).

    ``hot``: offsets of length / count / size fields; integer writes land there half of the time.
    ``others``: other seeds of the same format, for splicing.
    """
    buf = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(12)
        n = len(buf)
        if op <= 1 and n:  # bit flips
            for _ in range(rng.choice((1, 1, 2, 4, 8))):
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 2 and n:  # interesting byte
            buf[rng.randrange(n)] = _choice(rng, INTERESTING_BYTES)
        elif op in (3, 4) and n:  # an integer field set to a boundary value
            width = _choice(rng, (1, 2, 4, 4, 8))
            at = _choice(rng, hot) if hot and rng.random() < 0.5 else rng.randrange(n)
            at = max(0, min(at, n - 1))
            value = _choice(rng, INTERESTING_INTS + (n, n + 1, n - 1, n * 2))
            packed = _pack_int(rng, value, width)
            buf[at:at + width] = packed[: max(0, min(width, n - at))] if at + width > n else packed
        elif op == 5 and n:  # truncation
            cut = rng.choice((rng.randrange(n), n - rng.randrange(1, min(n, 64) + 1), n // 2, 0, 1))
            del buf[max(cut, 0):]
        elif op == 6 and n:  # delete a chunk
            i = rng.randrange(n)
            del buf[i:i + rng.choice((1, 2, 4, 16, 256, 4096))]
        elif op == 7 and n:  # duplicate a chunk in place
            i = rng.randrange(n)
            chunk = bytes(buf[i:i + rng.choice((1, 4, 16, 256, 4096))])
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = chunk * rng.choice((1, 2, 16))
        elif op == 8:  # insert random bytes
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 4, 8, 64))))
        elif op == 9 and others:  # splice: my head, another seed's tail
            other = _choice(rng, others)
            if other:
                i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other))
                buf = bytearray(bytes(buf[:i]) + other[j:])
        elif op == 10:  # garbage appended
            buf += bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64))))
        elif n:  # overwrite a chunk with a copy from elsewhere in the file
            i, j = rng.randrange(n), rng.randrange(n)
            k = rng.choice((2, 4, 8, 32))
            buf[i:i + k] = buf[j:j + k]
    return bytes(buf)


# ------------------------------------------------------------------------------------------ text
def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def mutate_text(rng: random.Random, data: bytes, others: Sequence[bytes] = ()) -> bytes:
    """``data`` (a text file) with 1..3 line / token operations applied; byte operations now and then."""
    if rng.random() < 0.15:
        return mutate_bytes(rng, data, others)
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(12)
        i = rng.randrange(len(lines)) if lines else 0
        if not lines:
            lines = [""]
        line = lines[i]
        tokens = line.split(_choice(rng, (" ", "\t", ","))) if line else [""]
        if op <= 2:  # a token (numbers preferred) replaced
            numeric = [k for k, t in enumerate(tokens) if _is_number(t.strip())]
            k = _choice(rng, numeric) if numeric and rng.random() < 0.7 else rng.randrange(len(tokens))
            tokens[k] = _choice(rng, INTERESTING_TOKENS)
            lines[i] = " ".join(tokens) if rng.random() < 0.5 else "\t".join(tokens)
        elif op == 3:  # a field dropped
            if len(tokens) > 1:
                del tokens[rng.randrange(len(tokens))]
            lines[i] = " ".join(tokens)
        elif op == 4:  # a field added
            tokens.insert(rng.randrange(len(tokens) + 1), _choice(rng, INTERESTING_TOKENS))
            lines[i] = " ".join(tokens)
        elif op == 5:  # a line deleted
            del lines[i]
        elif op == 6:  # a line repeated
            lines[i:i] = [line] * rng.choice((1, 2, 100))
        elif op == 7 and len(lines) > 1:  # two lines swapped
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 8:  # a line of another seed spliced in
            if others:
                other = _choice(rng, others).decode("utf-8", errors="replace").split("\n")
                lines.insert(i, _choice(rng, other))
        elif op == 9:  # a strange line break or control character inside the line
            pos = rng.randrange(len(line) + 1)
            lines[i] = line[:pos] + _choice(rng, LINE_BREAKS + ("\x00", "\ufeff", "\t\t", "  ")) + line[pos:]
        elif op == 10:  # an overlong line
            lines[i] = line + _choice(rng, ("x", "9", " 1", "/a")) * rng.choice((1000, 70000))
        else:  # everything after a line cut off
            del lines[i + 1:]
    out = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    if rng.random() < 0.05:  # a byte that is not UTF-8
        j = rng.randrange(len(out) + 1)
        out = out[:j] + _choice(rng, (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80")) + out[j:]
    return out


# ---------------------------------------------------------------------------------- parsed trees
def deep(depth: int, kind: str = "list") -> Any:
    """A nested structure ``depth`` levels deep (recursion limits, stack depth)."""
    node: Any = 0
    for _ in range(depth):
        node = [node] if kind == "list" else {"k": node}
    return node


def wide_alias(levels: int = 9, width: int = 10) -> Any:
    """A "billion laughs" structure: ``width ** levels`` leaves made of shared references (cheap in memory,
    expensive for anything that walks it without a memo, e.g. a repr or a recursive hash)."""
    node: Any = ["lol"]
    for _ in range(levels):
        node = [node] * width
    return node


def replacement(rng: random.Random, old: Any, aliases: bool = True) -> Any:
    """A value of another type (or an extreme one of the same type) to put where ``old`` was.

    ``aliases``: shared-reference structures too (YAML anchors, pickle memo references); off for formats
    that would write every copy out (JSON)."""
    pool: List[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: False, lambda: 0, lambda: -1, lambda: 2 ** 64, lambda: -(2 ** 63) - 1,
        lambda: 10 ** 30, lambda: float("nan"), lambda: float("inf"), lambda: -1e308, lambda: 1.5, lambda: "",
        lambda: "x", lambda: "../../outside", lambda: "\u00e9" * 3, lambda: "9" * 50, lambda: [], lambda: {},
        lambda: [old], lambda: {"k": old}, lambda: [old] * (1000 if aliases else 3), lambda: deep(rng.choice((50, 2000, 100000))),
        lambda: deep(rng.choice((50, 2000)), "dict"), lambda: b"bytes", lambda: (1, 2),
    ]
    if aliases:
        pool.append(lambda: wide_alias())
    if isinstance(old, bool):
        pool.append(lambda: not old)
    elif isinstance(old, int):
        pool += [lambda: old + 1, lambda: -old, lambda: old * 1000003, lambda: _choice(rng, INTERESTING_INTS)]
    elif isinstance(old, float):
        pool += [lambda: -old, lambda: old * 1e30, lambda: 0.0, lambda: math.nextafter(old, math.inf)]
    elif isinstance(old, str):
        pool += [lambda: old + old, lambda: old[:1], lambda: old.upper(), lambda: old + "/../../x"]
    elif isinstance(old, (list, tuple)):
        pool += [lambda: list(old)[:-1], lambda: list(old) + list(old), lambda: list(reversed(list(old)))]
    return _choice(rng, pool)()


def _nodes(tree: Any, path: tuple = (), out: Optional[list] = None, limit: int = 2000) -> list:
    """``(path, value)`` of every node (dict values and list items), breadth first, at most ``limit``."""
    out = [] if out is None else out
    queue = [(path, tree)]
    while queue and len(out) < limit:
        p, node = queue.pop(0)
        out.append((p, node))
        if len(p) >= 40:  # deep chains: the top of them is enough
            continue
        if isinstance(node, dict):
            queue += [(p + (k,), v) for k, v in list(node.items())[:200]]
        elif isinstance(node, (list, tuple)):
            queue += [(p + (i,), v) for i, v in enumerate(list(node)[:200])]
    return out


def _set(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        new = dict(tree)
        new[head] = _set(tree[head], rest, value)
        return new
    items = list(tree)
    items[head] = _set(items[head], rest, value)
    return tuple(items) if isinstance(tree, tuple) else items


def mutate_tree(rng: random.Random, tree: Any, rounds: Optional[int] = None, skip: Callable[[Any], bool] = None,
                aliases: bool = True) -> Any:
    """A copy of ``tree`` (dicts, lists, tuples, scalars) with 1..3 wrong-type / structure changes.

    ``skip(value)``: nodes not to descend into or replace (e.g. tensors, which a target mutates itself).
    """
    for _ in range(rounds if rounds is not None else rng.choice((1, 1, 2, 3))):
        nodes = [(p, v) for p, v in _nodes(tree) if not (skip and skip(v))]
        if not nodes:
            return tree
        path, value = _choice(rng, nodes)
        op = rng.randrange(6)
        if op <= 2 or not isinstance(value, (dict, list, tuple)):
            tree = _set(tree, path, replacement(rng, value, aliases))
        elif isinstance(value, dict) and op == 3 and value:
            new = dict(value)
            del new[_choice(rng, list(new))]
            tree = _set(tree, path, new)
        elif isinstance(value, dict):
            new = dict(value)
            new[_choice(rng, ("unknown", "k", "", 0, "__class__", "model", "config"))] = replacement(rng, None, aliases)
            tree = _set(tree, path, new)
        else:
            items = list(value)
            if op == 3 and items:
                del items[rng.randrange(len(items))]
            elif items:
                items.insert(rng.randrange(len(items) + 1), replacement(rng, _choice(rng, items), aliases))
            else:
                items.append(replacement(rng, None, aliases))
            tree = _set(tree, path, type(value)(items) if isinstance(value, tuple) else items)
    return tree


def interesting_offsets_u32(data: bytes, start: int, step: int, count: int) -> List[int]:
    """Offsets ``start, start + step, ...`` (``count`` of them) inside ``data``: the ``hot`` list of a format
    whose header has fields at fixed places."""
    return [o for o in range(start, start + step * count, step) if o < len(data)]


def u32le(data: bytes, at: int) -> int:
    return struct.unpack_from("<I", data, at)[0]
