"""Layer 1: speed/aot_blocks.py, a block compiled ahead of time (AOTInductor, on this CPU) and called in
place of its torch.compile'd form, on a plain torch block written as ComfyUI writes FLUX's (keyword
inputs, transformer_options, patches, adds into its input). The reference is the eager block itself: a
call the package serves must give the eager output; any other call must go to the fallback."""
import collections
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlora.speed import aot_blocks


class ToyBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.lin1 = nn.Linear(d, 2 * d)
        self.lin2 = nn.Linear(2 * d, d)

    def forward(self, img, vec, pe=None, attn_mask=None, transformer_options={}):
        patches = transformer_options.get("patches", {})
        h = self.lin2(F.gelu(self.lin1(self.norm(img) * (1 + vec[:, None]))))
        if "out_patch" in patches:
            for p in patches["out_patch"]:
                h = p(h)
        img += h  # as FLUX's blocks do: the caller takes the returned tensor
        return img


def seeded(seed, d=32):
    torch.manual_seed(seed)
    return ToyBlock(d).eval()


def inputs(tokens=8, d=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, tokens, d, generator=g), torch.randn(1, d, generator=g)


def call(block, img, vec, **opts):
    """As ComfyUI's Flux calls a single block: the image positional, the rest by keyword."""
    return block(img.clone(), vec=vec, pe=None, attn_mask=None, transformer_options=dict(opts))


Package = collections.namedtuple("Package", "runner sig layout path")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """One package built from block 0 for 8 tokens with empty options."""
    block = seeded(0)
    img, vec = inputs()
    path = str(tmp_path_factory.mktemp("aot") / "toy.pt2")
    sig, layout = aot_blocks.build_package(block, (img.clone(),), dict(vec=vec, pe=None, attn_mask=None,
                                                                   transformer_options={}), path)
    aot_blocks.save_record(path + ".json", block, sig, layout)
    return Package(aot_blocks.load_package(path), sig, layout, path)


def dispatched(block, package):
    runner, sig, layout, _ = package
    # the fallback: dynamo's call, no code generated (the pack's is inductor's)
    return aot_blocks.use_package(block, runner, sig, layout, compile_kwargs={"backend": "eager"})


def test_the_package_gives_the_eager_output_and_reads_the_live_weights(package):
    block = seeded(0)
    img, vec = inputs()
    ref = call(block, img, vec)
    d = dispatched(block, package)
    torch.testing.assert_close(call(block, img, vec), ref, rtol=1e-5, atol=1e-5)
    assert d.calls == {"package": 1, "fallback": 0}
    # a LoRA merged in place (the same tensor objects) is what the package computes
    with torch.no_grad():
        block.lin1.weight.add_(0.05 * torch.randn_like(block.lin1.weight))
    merged = call(block, img, vec)
    assert d.calls["package"] == 2
    assert (merged - ref).abs().max() > 1e-3
    block._compiled_call_impl = None  # eager again: the reference for the merged weights
    torch.testing.assert_close(merged, call(block, img, vec), rtol=1e-5, atol=1e-5)


def test_one_package_serves_every_block_of_the_kind(package):
    other = seeded(5)
    img, vec = inputs()
    ref = call(other, img, vec)
    d = dispatched(other, package)
    out = call(other, img, vec)
    assert d.calls["package"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_calls_the_package_was_not_exported_for_go_to_the_fallback(package):
    block = seeded(0)
    d = dispatched(block, package)
    img, vec = inputs(tokens=12)  # another resolution
    assert d._fallback is None  # not made before a call needs it: a restart whose calls fit traces nothing
    out = call(block, img, vec)
    assert d.calls == {"package": 0, "fallback": 1}
    img8, vec8 = inputs()
    doubled = call(block, img8, vec8, patches={"out_patch": [lambda h: 2 * h]})  # a patch the export lacks
    assert d.calls == {"package": 0, "fallback": 2}
    masked = block(img8.clone(), vec=vec8, pe=None, attn_mask=torch.ones(1), transformer_options={})  # another argument
    assert d.calls == {"package": 0, "fallback": 3}
    block._compiled_call_impl = None
    torch.testing.assert_close(out, call(block, img, vec))
    torch.testing.assert_close(doubled, call(block, img8, vec8, patches={"out_patch": [lambda h: 2 * h]}))
    torch.testing.assert_close(masked, call(block, img8, vec8))


def test_options_the_block_does_not_read_do_not_matter(package):
    block = seeded(0)
    img, vec = inputs()
    ref = call(block, img, vec, block_index=3, sigmas=torch.ones(1))
    d = dispatched(block, package)
    torch.testing.assert_close(call(block, img, vec, block_index=7, sigmas=torch.zeros(1)), ref, rtol=1e-5, atol=1e-5)
    assert d.calls["package"] == 1


def test_layers_with_comfyui_patch_functions_go_to_the_fallback(package):
    block = seeded(0)
    img, vec = inputs()
    d = dispatched(block, package)
    block.lin1.weight_function = [lambda w: w]  # what ComfyUI's patcher sets for a lazy LoRA
    call(block, img, vec)
    assert d.calls == {"package": 0, "fallback": 1}


def test_a_block_that_writes_into_its_options_is_refused():
    class Writes(ToyBlock):
        def forward(self, img, vec, pe=None, attn_mask=None, transformer_options={}):
            transformer_options["seen"] = True
            return super().forward(img, vec, pe, attn_mask, transformer_options)

    img, vec = inputs()
    with pytest.raises(ValueError, match="writes into transformer_options"):
        aot_blocks.export_block(Writes(), (img,), dict(vec=vec, transformer_options={}))


def test_tensor_subclass_weights_go_in_as_their_inner_tensors():
    """torchao's per-row fp8 weights (the pack's torchao-fp8-dynamic), flattened and rebuilt: the
    functional call on the plain tensors equals the block's own call, and the export takes them."""
    f8 = pytest.importorskip("torchao.quantization.quantize_.workflows.float8.float8_tensor")
    from torchao.quantization.granularity import PerRow

    block = seeded(0)
    for lin in (block.lin1, block.lin2):
        lin.weight = nn.Parameter(f8.Float8Tensor.from_hp(lin.weight.data, granularity=PerRow()), requires_grad=False)
    layout = aot_blocks.weight_layout(block)
    assert layout["lin1.weight"][1] == ("qdata", "scale") and layout["lin1.bias"] is None
    plain = aot_blocks.plain_weights(block, layout)
    assert plain["lin1.weight.qdata"] is block.lin1.weight.qdata  # the same storage: merges in place show
    img, vec = inputs()
    ref = call(block, img, vec)
    out = torch.func.functional_call(block, aot_blocks.rebuild(plain, layout), (img.clone(),),
                                     dict(vec=vec, transformer_options={}))
    torch.testing.assert_close(out, ref)
    program, sig, _ = aot_blocks.export_block(block, (img.clone(),), dict(vec=vec, transformer_options={}))
    assert sig.tensors == ["img", "vec"]
    torch.testing.assert_close(program.module()(plain, img.clone(), vec), ref)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESTART = """
import importlib.util, json, sys
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
load("_quantlora_bootstrap", sys.argv[1]).register_pack(sys.argv[2])
toy = load(sys.argv[6], sys.argv[3])  # under pytest's name for it: the class's module is in the fingerprint
from quantlora.speed import aot_blocks
block = toy.seeded(int(sys.argv[5]))
img, vec = toy.inputs()
loaded = aot_blocks.load_record(sys.argv[4] + ".json", block)
if loaded is None:
    print(json.dumps({"record": "refused"}))
    sys.exit(0)
d = aot_blocks.use_package(block, aot_blocks.load_package(sys.argv[4]), *loaded)
out = toy.call(block, img, vec)
compiler = "torch._inductor.compile_fx" in sys.modules
isa = sys.modules.get("torch._inductor.cpu_vec_isa")
isa_probed = bool(isa and isa.valid_vec_isa_list.cache_info().currsize)
fallback_made = d._fallback is not None
block._compiled_call_impl = None
print(json.dumps({"calls": d.calls, "compiler_imported": compiler, "fallback_made": fallback_made,
                  "isa_probed": isa_probed,
                  "diff": float((out - toy.call(block, img, vec)).abs().max())}))
"""


def restart(package_path, seed=0, d=None):
    cmd = [sys.executable, "-c", RESTART, os.path.join(ROOT, "tools", "bootstrap.py"), ROOT, __file__, package_path, str(seed), ToyBlock.__module__]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restart_serves_the_call_from_the_package_without_the_compiler(package):
    """A fresh process (a restarted server) reads the record kept beside the package, checks the block is
    what the package was exported from, and serves the call: nothing traced, inductor's compiler never
    imported (torch._inductor's package itself imports dynamo's modules)."""
    got = restart(package.path)
    assert got["calls"] == {"package": 1, "fallback": 0}, got
    assert got["compiler_imported"] is False and got["fallback_made"] is False, got
    assert got["diff"] < 1e-5, got
    # torch's loader would compile and run a test program per CPU vector ISA (15-25 s): skipped
    assert got["isa_probed"] is False, got


def test_a_record_from_another_block_layout_is_refused(package, tmp_path):
    """A record whose fingerprint differs (here: a weight of another dtype) is not used."""
    block = seeded(0)
    block.lin2.bias = nn.Parameter(block.lin2.bias.data.double())
    _, sig, layout, _ = package
    aot_blocks.save_record(str(tmp_path / "other.pt2.json"), block, sig, aot_blocks.weight_layout(block))
    assert aot_blocks.load_record(str(tmp_path / "other.pt2.json"), seeded(0)) is None
    assert aot_blocks.load_record(package.path + ".json", seeded(3)) is not None  # other values, same layout
    assert aot_blocks.load_record(str(tmp_path / "missing.json"), seeded(0)) is None


def test_the_load_check_keeps_its_verdict(tmp_path, monkeypatch):
    """speed/aot_store.loads_here builds and loads a tiny package in a child process once; the verdict is
    kept per torch version, compiler and device type, and a crash there is a reason, not a crash here."""
    from quantlora.speed import aot_store

    runs = []

    class Crashed:
        returncode, stdout, stderr = -11, "", "Fatal Python error: Segmentation fault"

    monkeypatch.setattr(aot_store.subprocess, "run", lambda *a, **k: runs.append(a) or Crashed())
    why = aot_store.loads_here(str(tmp_path), torch.device("cpu"))
    assert why.startswith("a test package did not load in a child process (exit -11") and "Segmentation" in why
    assert aot_store.loads_here(str(tmp_path), torch.device("cpu")) == why and len(runs) == 1  # kept
    monkeypatch.setenv("CXX", "/usr/bin/other-g++")  # another compiler: checked again
    aot_store.loads_here(str(tmp_path), torch.device("cpu"))
    assert len(runs) == 2


def test_where_cxx_builds_packages_that_crash_the_system_gpp_builds_them(tmp_path, monkeypatch):
    """The H200 image's CXX builds packages that crash at load and its /usr/bin/g++ builds ones that load
    (BENCHMARKS.md issue 12, eighteenth round): $CXX is checked first, then the system's g++, each in a
    child process once; the store then builds with the one that loaded."""
    from quantlora.speed import aot_store

    runs = []

    class Done:
        def __init__(self, loads):
            self.returncode, self.stdout, self.stderr = (0, "LOADS\n", "") if loads else (-11, "", "Segmentation fault")

    def run(cmd, env=None, **kwargs):
        compiler = (env or os.environ).get("CXX")
        runs.append(compiler)
        return Done(loads=compiler == "/usr/bin/g++")

    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    monkeypatch.setattr(aot_store.subprocess, "run", run)
    monkeypatch.setattr(aot_store, "_system_compiler", lambda: "/usr/bin/g++")
    assert aot_store.compiler_here(str(tmp_path), torch.device("cpu")) == ("/usr/bin/g++", None)
    assert runs == ["/opt/gcc/bin/g++", "/usr/bin/g++"]
    assert aot_store.compiler_here(str(tmp_path), torch.device("cpu")) == ("/usr/bin/g++", None)
    assert len(runs) == 2  # both verdicts kept
    monkeypatch.setattr(aot_store, "_system_compiler", lambda: None)  # no other compiler: the first reason
    cxx, why = aot_store.compiler_here(str(tmp_path), torch.device("cpu"))
    assert cxx is None and "exit -11" in why

    from torch._inductor import config

    before = config.cpp.cxx
    with aot_store.compiler_context("/usr/bin/g++"):
        assert config.cpp.cxx == (None, "/usr/bin/g++")
    assert config.cpp.cxx == before
    with aot_store.compiler_context(""):
        assert config.cpp.cxx == before


def test_a_hook_or_another_weight_dtype_set_later_goes_to_the_fallback(package):
    """Another node's casting hook on a layer, or a weight swapped for one of another dtype, after the
    package was attached: the package was not exported for that block."""
    img, vec = inputs()
    block = seeded(0)
    d = dispatched(block, package)
    handle = block.lin2.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    hooked = call(block, img, vec)
    assert d.calls == {"package": 0, "fallback": 1}
    handle.remove()
    call(block, img, vec)
    assert d.calls == {"package": 1, "fallback": 1}
    block.lin1.weight = nn.Parameter(block.lin1.weight.data.double(), requires_grad=False)
    block.lin1.bias = nn.Parameter(block.lin1.bias.data.double(), requires_grad=False)
    with pytest.raises(RuntimeError):  # the eager block itself refuses float32 input with float64 weights...
        call(block, img, vec)
    assert d.calls == {"package": 1, "fallback": 2}  # ...and it was the fallback that ran, not the package
    # (what the fallback computed with the hook is dynamo's business: it does not guard on hooks added
    # after a compile unless asked, torch._dynamo.config.skip_nnmodule_hook_guards)
    assert hooked.shape == img.shape


def test_packages_are_kept_per_device_kind():
    """A package's kernels are built for one GPU architecture: each device kind has its own folder."""
    from quantlora.speed import aot_store

    assert aot_store.device_tag(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        tag = aot_store.device_tag(torch.device("cuda"))
        assert tag.startswith("cuda-sm") and torch.version.cuda in tag


class RowQuantUser(nn.Module):
    """A graph with one of the pack's own custom operators (the fp8 row quantization of the GPU path; its
    CPU kernel here), as a block's exported program holds it."""

    def forward(self, x):
        q, s = torch.ops.quantlora.quant_rows_fp8(x, -1)
        return q.float() * s


def test_a_deferred_build_imports_the_programs_custom_operators_in_its_child(tmp_path):
    """speed/aot_store's builder: a saved program whose graph calls the pack's custom operator is built in a
    child process that imports the operator's module first (else the program does not load there); the
    package and its record land where the next load looks, and compute what the program computes."""
    from quantlora.speed import aot_store, rowquant  # noqa: F401 - registers quantlora::quant_rows_fp8

    x = torch.randn(8, 64)
    program = torch.export.export(RowQuantUser(), (x,))
    assert aot_store.op_modules(program) == ["quantlora.speed.rowquant"]
    store = aot_store.AOTStore(str(tmp_path), cxx="")  # $CXX: the verdict of the server-side tests' check
    path = str(tmp_path / "kind" / "call.pt2")
    os.makedirs(os.path.dirname(path))
    store._defer("RowQuantUser", program, {"fingerprint": "kind", "call": {}}, path, 0.0, str(tmp_path / "failed.log"))
    assert aot_store.BUILDER.wait(600)
    assert store.stats["built"] == 1 and not store.stats["failed"], store.stats
    assert json.load(open(path + ".json")) == {"fingerprint": "kind", "call": {}}
    assert sorted(os.listdir(tmp_path / "kind")) == ["call.pt2", "call.pt2.json"]  # the saved program removed
    torch.testing.assert_close(aot_blocks.load_package(path)(x), program.module()(x))


@torch.library.triton_op("quantloratest::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:  # a triton_op, as the pack's GPU ops are (no kernel needed here)
    return x * 2


class TritonOpUser(nn.Module):
    def forward(self, x):
        return torch.ops.quantloratest.doubled(x) + 1


def test_the_build_child_imports_the_module_that_defines_a_triton_op():
    """torch.library.triton_op registers a wrapper function of torch's own: the child must import the module
    of the function inside it (on an H200 it imported torch._library.triton instead, the program's load
    failed and no package was built)."""
    from quantlora.speed import aot_store

    program = torch.export.export(TritonOpUser(), (torch.randn(4, 8),))
    assert aot_store.op_modules(program) == [__name__]


def test_builds_queued_during_a_sampling_start_after_it(monkeypatch):
    """speed/aot_store.Builder.hold (around each sampling, nodes/runtime.py): a child compiling beside the
    sampling slowed its own compiles, so the builds queued meanwhile start when it ends."""
    from quantlora.speed import aot_store

    started = []
    monkeypatch.setattr(aot_store, "build_in_child", lambda job: started.append(job.name))
    builder = aot_store.Builder()
    job = lambda name: aot_store.BuildJob(name, "/nonexistent/program.pt2", "", {}, [], None, "")
    with builder.hold():
        with builder.hold():  # nested samplings: the outer one's end starts them
            builder.put(job("double"))
        builder.put(job("single"))
        assert not builder.wait(0.5) and started == []
    assert builder.wait(60) and sorted(started) == ["double", "single"]
    builder.put(job("outside"))  # no sampling: at once
    assert builder.wait(60) and started[-1] == "outside"


def test_a_failed_child_build_leaves_its_whole_output_as_the_failed_log(tmp_path):
    """The child writes its own output to a file and renames it to the failed-build log itself (on an H200
    the server had stopped before a child failed, and nothing said why); the server's thread reports it."""
    from quantlora.speed import aot_store

    program_path = tmp_path / "call.program1.pt2"
    program_path.write_bytes(b"not a saved program")
    store = aot_store.AOTStore(str(tmp_path), cxx="")
    failed_log = tmp_path / "failed-call.log"
    job = aot_store.BuildJob("Block", str(program_path), str(tmp_path / "call.pt2"), {}, [], store, str(failed_log))
    with pytest.raises(RuntimeError, match="failed-call.log"):
        aot_store.build_in_child(job)
    text = failed_log.read_text()
    assert "Traceback" in text and text.rstrip().endswith("FAILED")
    assert sorted(os.listdir(tmp_path)) == ["failed-call.log"]  # the program and the build log gone


def test_a_build_child_where_no_package_loads_says_why_and_builds_nothing(tmp_path, monkeypatch):
    """The first build on a machine runs the load check in its child (speed/aot_store.child_build): where
    neither $CXX nor the system's g++ builds loadable packages it answers why, builds nothing and removes
    the saved program."""
    from quantlora.speed import aot_store

    program_path = tmp_path / "call.program1.pt2"
    program_path.write_bytes(b"saved program")
    monkeypatch.setattr(aot_store, "compiler_here", lambda root, device: (None, "a test package did not load (exit -11)"))
    monkeypatch.setattr(torch.export, "load", lambda path: pytest.fail("loaded the program after a failed check"))
    job = {"program": str(program_path), "path": str(tmp_path / "call.pt2"), "record": {}, "cxx": None,
           "check_root": str(tmp_path), "device": "cpu"}
    assert aot_store.child_build(job) == "NOLOAD a test package did not load (exit -11)"
    assert os.listdir(tmp_path) == []


def test_a_call_whose_build_failed_is_not_built_again_while_its_log_is_kept(tmp_path, monkeypatch, caplog):
    """A build that fails (here its export) leaves a log naming why; later loads of the same block kind
    and call shape go to the fallback at once instead of failing again at every restart; deleting the log
    retries."""
    from quantlora.speed import aot_store

    def fails(*a, **k):
        raise RuntimeError("unsupported operator in the block")

    monkeypatch.setattr(aot_blocks, "export_block", fails)
    block, (img, vec) = seeded(0), inputs()
    kwargs = dict(vec=vec, transformer_options={})
    store = aot_store.AOTStore(str(tmp_path), cxx="")
    fingerprint = aot_blocks.block_fingerprint(block, aot_blocks.weight_layout(block))
    assert store._build(fingerprint, block, (img,), kwargs) is None
    log_path = store._failed_log(fingerprint, (img,), kwargs)
    assert "unsupported operator in the block" in open(log_path).read()

    monkeypatch.setattr(aot_blocks, "export_block", lambda *a, **k: pytest.fail("built again"))
    restarted = aot_store.AOTStore(str(tmp_path), cxx="")
    with caplog.at_level("WARNING", logger="quantlora"):
        assert restarted._build(fingerprint, seeded(1), (img,), kwargs) is None
    assert "an earlier build failed" in caplog.text and log_path in caplog.text
    os.remove(log_path)
    with pytest.raises(pytest.fail.Exception, match="built again"):
        restarted._build(fingerprint, seeded(1), (img,), kwargs)


def test_packages_are_on_by_default_on_cuda_only_and_built_in_children(monkeypatch):
    """speed/aot_store: unset, the packages serve CUDA devices (measured there: BENCHMARKS.md issue 12,
    twentieth round) and not CPUs; QUANTLORA_AOT_BLOCKS=0/1 decides either way; builds go to children
    unless QUANTLORA_AOT_BUILD=inline."""
    from quantlora.speed import aot_store

    monkeypatch.delenv("QUANTLORA_AOT_BLOCKS", raising=False)
    monkeypatch.delenv("QUANTLORA_AOT_BUILD", raising=False)
    assert aot_store.enabled(torch.device("cuda", 0)) and not aot_store.enabled("cpu")
    assert aot_store.deferred() and not aot_store.asked()
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "0")
    assert not aot_store.enabled("cuda")
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "1")
    assert aot_store.enabled("cpu") and aot_store.asked()
    monkeypatch.setenv("QUANTLORA_AOT_BUILD", "inline")
    assert not aot_store.deferred()
