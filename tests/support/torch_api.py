"""Which torch APIs this repository uses, and since which torch release each one exists.

``scan(paths)`` reads Python files with ``ast`` (nothing is imported) and returns every torch name
they reach: imports (``torch.distributed.fsdp.fully_shard``), attribute chains from an imported
torch module or a module-level alias of one (``dist.all_reduce`` -> ``torch.distributed.all_reduce``),
and for calls of those names each keyword (``torch.distributed.checkpoint.save(no_dist=)``) and the
number of positional arguments (``torch.is_autocast_enabled(*1)``). Methods called on objects
(``mesh.get_group()``, ``tensor.movedim(...)``) are not seen: their types are unknown statically.

``load_table()`` reads ``torch_api_versions.txt``: for each name, the first torch release, of those
checked, from which on its sources define it. ``tests/project/test_torch_minimum.py`` holds the package's
declared minimum against it.

The table is made by this file run as a script (maintainers; it needs PyPI). It reads the Python
sources and type stubs (``*.pyi``, which describe the C++ bindings) out of each release's Linux
wheel by HTTP range requests (about 15 MB of each wheel), resolves every scanned name in them
statically (module files, definitions, imports, ``from m import *``, class bodies, signatures),
and prints the table (``VERSION=DIR`` reads an unpacked wheel or a site-packages instead)::

    python tests/support/torch_api.py 2.3.0 2.4.0 2.5.0 2.6.0 2.7.0 2.8.0 2.9.0 2.10.0 2.11.0 2.12.0 \
        2.13.0=.venv/lib/python3.11/site-packages > tests/support/torch_api_versions.txt

A name the resolver cannot decide (a value's attribute, a ``**kwargs`` signature, ``torch.ops``)
counts as present and is listed in a comment line with where it was checked by hand (``BY_HAND``).
"""

from __future__ import annotations

import ast
import io
import re
import sys
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = Path(__file__).with_name("torch_api_versions.txt")

# Methods of torch objects the package calls (not seen by the scan, which knows no types): the
# version-sensitive ones, those of the distributed objects. Resolved like the scanned names.
METHODS = (
    "torch.distributed.ProcessGroup.group_name",
    "torch.distributed.ProcessGroup.size",
    "torch.distributed.ProcessGroup.rank",
    "torch.distributed.device_mesh.DeviceMesh.get_group",
    "torch.distributed.device_mesh.DeviceMesh.get_local_rank",
    "torch.distributed.device_mesh.DeviceMesh.size",
    "torch.distributed.device_mesh.DeviceMesh.ndim",
    "torch.distributed.device_mesh.DeviceMesh.__getitem__",
    "torch.distributed.fsdp.FSDPModule.set_requires_gradient_sync",
    "torch.distributed.tensor.DTensor.to_local",
    "torch.distributed.tensor.DTensor.device_mesh",
    "torch.distributed.tensor.DTensor.placements",
)

# What the resolver cannot decide, and where each was checked by hand (in 2.3.0's sources unless said).
BY_HAND = {
    "torch.Size(*1)": "torch.Size(sequence), a C class since 1.0",
    "torch.distributed.ProcessGroupGloo._Options": "bound as '_Options' in torch/csrc/distributed/c10d/init.cpp "
    "(stubs say 'Options'); present in 2.13.0",
    "torch.distributed.ProcessGroupGloo._Options(*0)": "py::init<>() in the same binding",
    "torch.distributed.group.WORLD": "a class property of group (metaclass _WorldMeta) in distributed_c10d.py",
    "torch.distributed.rendezvous(timeout=)": "passed on to _env_rendezvous_handler(url, timeout=..., **kwargs)",
    "torch.distributed.tensor.Shard(*1)": "a dataclass with the one field dim",
    "torch.linalg.vector_norm(*2)": "vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None), since 1.10",
    "torch.linalg.vector_norm(dtype=)": "the same",
    "torch.ops._c10d_functional": "a C++ op namespace; _functional_collectives.py calls the three ops below",
    "torch.ops._c10d_functional.all_reduce": "called as all_reduce(input, op, group_name)",
    "torch.ops._c10d_functional.all_reduce(*3)": "the same",
    "torch.ops._c10d_functional.reduce_scatter_tensor": "called as reduce_scatter_tensor(input, op, group_size, group_name)",
    "torch.ops._c10d_functional.reduce_scatter_tensor(*4)": "the same",
    "torch.ops._c10d_functional.wait_tensor": "called as wait_tensor(tensor)",
    "torch.ops._c10d_functional.wait_tensor(*1)": "the same",
    "torch.ops.aten": "the ATen op namespace (every release)",
    "torch.ops.aten.gelu_backward": "called as gelu_backward(grad, self, approximate=...), as autograd's derivatives.yaml does since 1.12",
    "torch.ops.aten.gelu_backward(*2)": "the same",
    "torch.ops.aten.gelu_backward(approximate=)": "the same",
    "torch.ops.aten.silu_backward": "called as silu_backward(grad_output, self), autograd's derivative of silu since 1.7",
    "torch.ops.aten.silu_backward(*2)": "the same",
    "torch.ops.aten.silu_backward.grad_input": "the out= overload silu_backward.grad_input(grad_output, self, *, grad_input) "
    "of native_functions.yaml (structured kernel; 2.3.0 and 2.13.0)",
    "torch.ops.aten.silu_backward.grad_input(*2)": "the same",
    "torch.ops.aten.silu_backward.grad_input(grad_input=)": "the same",
    "torch.ops.aten.gelu_backward.grad_input": "gelu_backward.grad_input(grad_output, self, *, approximate='none', "
    "grad_input) in native_functions.yaml (2.3.0 and 2.13.0)",
    "torch.ops.aten.gelu_backward.grad_input(*2)": "the same",
    "torch.ops.aten.gelu_backward.grad_input(approximate=)": "the same",
    "torch.ops.aten.gelu_backward.grad_input(grad_input=)": "the same",
    "torch.ops.aten.threshold_backward.grad_input": "threshold_backward.grad_input(grad_output, self, threshold, *, "
    "grad_input) in native_functions.yaml (2.3.0 and 2.13.0)",
    "torch.ops.aten.threshold_backward.grad_input(*3)": "the same",
    "torch.ops.aten.threshold_backward.grad_input(grad_input=)": "the same",
    "torch.ops.aten.threshold_backward": "called as threshold_backward(grad_output, self, threshold), relu's derivative",
    "torch.ops.aten.threshold_backward(*3)": "the same",
}


def _is_torch(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


def scan_source(text: str) -> set[str]:
    """The torch names one module's source reaches (see the module docstring)."""
    tree = ast.parse(text)
    alias: dict[str, str] = {}
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_torch(a.name):
                    used.add(a.name)
                    alias[a.asname or "torch"] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_torch(node.module):
            for a in node.names:
                used.add(f"{node.module}.{a.name}")
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualified(n: ast.expr) -> str | None:
        parts = []
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        if isinstance(n, ast.Name) and n.id in alias:
            return ".".join([alias[n.id], *reversed(parts)])
        return None

    # Module-level aliases: `_c10d = torch.ops._c10d_functional`.
    for st in tree.body:
        if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
            q = qualified(st.value)
            if q:
                alias[st.targets[0].id] = q
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            q = qualified(node)
            if q:
                used.add(q)
        elif isinstance(node, ast.Call):
            q = qualified(node.func)
            if q:
                used.add(q)
                used.update(f"{q}({k.arg}=)" for k in node.keywords if k.arg)
                if not any(isinstance(a, ast.Starred) for a in node.args):
                    used.add(f"{q}(*{len(node.args)})")
    return used


def scan(paths: list[Path]) -> dict[str, set[str]]:
    """``{name: {files using it}}`` over every ``*.py`` under ``paths`` (files or directories)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for f in sorted([path] if path.is_file() else path.rglob("*.py")):
            for name in scan_source(f.read_text()):
                found.setdefault(name, set()).add(str(f.relative_to(ROOT)))
    return found


def load_table(path: Path = TABLE) -> dict[str, tuple[int, int]]:
    """``{name: (major, minor)}`` from the table file (``2.4  torch.get_autocast_dtype`` lines)."""
    table = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            version, name = line.split()
            major, minor = version.split(".")
            table[name] = (int(major), int(minor))
    return table


# ---- making the table: static resolution in a release's sources --------------------------------


class _Sources:
    """A release's ``torch/**/*.py`` and ``*.pyi``, keyed by path, and names resolved in them."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.dirs = {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}
        self._ns: dict[str, dict] = {}

    def _module_files(self, mod: str) -> list[tuple[str, str]]:
        p = mod.replace(".", "/")
        cands = (f"{p}/__init__.py", f"{p}.py", f"{p}/__init__.pyi", f"{p}.pyi")
        return [(c, self.files[c]) for c in cands if c in self.files]

    def _is_module(self, mod: str) -> bool:
        return bool(self._module_files(mod)) or mod.replace(".", "/") in self.dirs

    def _namespace(self, mod: str) -> dict:
        if mod not in self._ns:
            ns: dict = {}
            self._ns[mod] = ns  # before filling: import cycles see a partial namespace
            for path, text in self._module_files(mod):
                try:
                    body = ast.parse(text).body
                except SyntaxError:
                    continue
                self._collect(
                    body, mod if path.rsplit("/", 1)[1].startswith("__init__") else mod.rpartition(".")[0], ns
                )
            if mod == "torch":  # torch/__init__.py copies the C functions in a loop
                for n, v in self._namespace("torch._C._VariableFunctions").items():
                    ns.setdefault(n, v)
        return self._ns[mod]

    def _exports(self, mod: str) -> set[str] | None:
        """``__all__``: its literal value plus the names later added to it (``__all__ += [...]``)."""
        names: set[str] | None = None
        for _, text in self._module_files(mod):
            for node in ast.walk(ast.parse(text)):
                target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
                if isinstance(node, (ast.Assign, ast.AugAssign)) and getattr(target, "id", None) == "__all__":
                    try:
                        names = (names or set()) | set(ast.literal_eval(node.value))
                    except ValueError:
                        pass
        return names

    def _collect(self, body: list[ast.stmt], pkg: str, ns: dict) -> None:
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = ns.setdefault(st.name, ("def", []))
                if kind[0] == "def":
                    kind[1].append(st)
            elif isinstance(st, ast.ClassDef):
                ns[st.name] = ("class", st, pkg)
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in st.targets if isinstance(st, ast.Assign) else [st.target]:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            ns.setdefault(n.id, ("value",))
            elif isinstance(st, ast.Import):
                for a in st.names:
                    ns[a.asname or a.name.split(".")[0]] = ("module", a.name if a.asname else a.name.split(".")[0])
            elif isinstance(st, ast.ImportFrom):
                base = st.module or ""
                if st.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - st.level + 1] + ([st.module] if st.module else []))
                for a in st.names:
                    if a.name != "*":
                        ns[a.asname or a.name] = ("ref", f"{base}.{a.name}")
                        continue
                    exports = self._exports(base)
                    for n, v in list(self._namespace(base).items()):
                        if (n in exports) if exports is not None else not n.startswith("_"):
                            ns.setdefault(n, v)
            elif isinstance(st, (ast.If, ast.Try, ast.With)):
                for block in (st.body, getattr(st, "orelse", []), getattr(st, "finalbody", [])):
                    self._collect(block, pkg, ns)
                for h in getattr(st, "handlers", []):
                    self._collect(h.body, pkg, ns)

    def _lookup(self, obj: tuple, attr: str, depth: int = 0):
        if depth > 40:
            return None
        if obj[0] == "module":
            ns = self._namespace(obj[1])
            if attr in ns:
                v = ns[attr]
                if v[0] == "ref":
                    if self._is_module(v[1]):
                        return ("module", v[1])
                    mod, _, name = v[1].rpartition(".")
                    return self._lookup(("module", mod), name, depth + 1)
                return v
            return ("module", f"{obj[1]}.{attr}") if self._is_module(f"{obj[1]}.{attr}") else None
        if obj[0] == "class":
            node, pkg = obj[1], obj[2]
            defs = [s for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == attr]
            if defs:
                return ("def", defs)
            for st in node.body:
                if isinstance(st, ast.ClassDef) and st.name == attr:
                    return ("class", st, pkg)
                targets = (
                    st.targets if isinstance(st, ast.Assign) else [st.target] if isinstance(st, ast.AnnAssign) else []
                )
                if any(getattr(t, "id", None) == attr for t in targets):
                    return ("value",)
            for base in node.bases:
                if isinstance(base, ast.Name):
                    b = self._lookup(("module", obj[2]), base.id, depth + 1)
                    if b and b[0] == "class" and (found := self._lookup(b, attr, depth + 1)):
                        return found
            # a base the resolver cannot see (a C class, a generic) may define it
            return ("unknown",) if node.bases or node.keywords else None
        return ("unknown",)

    def resolve(self, name: str) -> bool | None:
        """True / False: defined or not in these sources; None: cannot tell statically."""
        m = re.fullmatch(r"([\w.]+)(?:\((?:(\w+)=|\*(\d+))\))?", name)
        qual, kw, npos = m.group(1), m.group(2), m.group(3)
        parts = qual.split(".")
        obj: tuple | None = ("module", parts[0])
        for attr in parts[1:]:
            obj = self._lookup(obj, attr)
            if obj is None:
                return False
        if obj[0] in ("value", "unknown"):
            return None if (kw or npos or obj[0] == "unknown") else True
        if kw is None and npos is None:
            return True
        return self._accepts(obj, kw, None if npos is None else int(npos))

    def _accepts(self, obj: tuple, kw: str | None, npos: int | None) -> bool | None:
        if obj[0] == "class":
            inits = [s for s in obj[1].body if getattr(s, "name", None) in ("__init__", "__new__")]
            if not inits:
                fields = [
                    s.target.id for s in obj[1].body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                ]
                if kw is not None and kw in fields or npos is not None and npos <= len(fields):
                    return True
                return None
            obj, npos = ("def", inits), None if npos is None else npos + 1  # + self
        if obj[0] != "def":
            return None
        unknown = False
        for f in obj[1]:
            a = f.args
            positional = [p.arg for p in a.posonlyargs + a.args]
            if kw is not None and (kw in positional or kw in [p.arg for p in a.kwonlyargs]):
                return True
            if npos is not None and (npos <= len(positional) or a.vararg):
                return True
            unknown |= kw is not None and a.kwarg is not None
        return None if unknown else False


def _wheel_sources(version: str) -> dict[str, str]:
    """The ``torch/`` Python sources and stubs of PyPI's CPython 3.11 Linux x86_64 wheel."""
    index = urllib.request.urlopen("https://pypi.org/simple/torch/", timeout=60).read().decode()
    pattern = rf'href="([^"#]+/torch-{re.escape(version)}-cp311-cp311-manylinux[^"#/]*x86_64\.whl)'
    url = re.search(pattern, index).group(1)
    with zipfile.ZipFile(io.BufferedReader(_HTTPRangeFile(url), buffer_size=1 << 20)) as z:
        infos = sorted(z.infolist(), key=lambda i: i.header_offset)  # in file order: fewer requests
        return {
            i.filename: z.read(i).decode("utf-8", "replace")
            for i in infos
            if i.filename.startswith("torch/") and i.filename.endswith((".py", ".pyi"))
        }


def _dir_sources(site_packages: Path) -> dict[str, str]:
    """The same from an unpacked wheel or a ``site-packages`` directory."""
    return {
        str(f.relative_to(site_packages)): f.read_text(errors="replace")
        for f in (site_packages / "torch").rglob("*.py*")
        if f.suffix in (".py", ".pyi")
    }


class _HTTPRangeFile(io.RawIOBase):
    """A read-only, seekable file over HTTP range requests, cached in 1 MiB blocks."""

    BLOCK = 1 << 20

    def __init__(self, url: str) -> None:
        self.url, self.pos, self.blocks = url, 0, {}
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, self.size)[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        done = 0
        while done < n:
            b, off = divmod(self.pos, self.BLOCK)
            if b not in self.blocks:
                lo, hi = b * self.BLOCK, min((b + 1) * self.BLOCK, self.size) - 1
                req = urllib.request.Request(self.url, headers={"Range": f"bytes={lo}-{hi}"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    self.blocks[b] = r.read()
            chunk = self.blocks[b][off : off + n - done]
            buf[done : done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done


def main(args: list[str]) -> None:
    """``args``: releases (``2.4.0``), each optionally ``=DIR`` to read an unpacked copy instead of PyPI."""
    names = set(scan([ROOT / "tp_ffn", ROOT / "scripts", ROOT / "benchmarks"])) | set(METHODS)
    versions = [a.partition("=")[0] for a in args]
    sources = {
        v: _Sources(_dir_sources(Path(d)) if d else _wheel_sources(v)) for v, _, d in (a.partition("=") for a in args)
    }
    undecided = []
    print(f"# First torch release, of {', '.join(versions)}, from which on the sources define each name")
    print(f"# (made by tests/support/torch_api.py; {versions[0]} = already there in the oldest release checked).")
    for name in sorted(names):
        present = [sources[v].resolve(name) for v in versions]
        if None in present:
            undecided.append(name)
        first = next((i for i in range(len(versions)) if False not in present[i:]), None)
        if first is None:
            print(f"# missing in {versions[-1]}: {name}")
            continue
        print(f"{'.'.join(versions[first].split('.')[:2]):<6}{name}")
    for name in undecided:
        print(f"# not decided statically, counted as present: {name}: {BY_HAND.get(name, 'CHECK BY HAND')}")


if __name__ == "__main__":
    main(sys.argv[1:])
