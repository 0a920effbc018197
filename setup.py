"""Build of tgvkv: one extension module, tgvkv._C (CPU kernels, plus CUDA kernels when possible).

Build with ``pip install --no-build-isolation .`` so that the extension is compiled against the
torch that will run it (torch is deliberately not a build requirement, see pyproject.toml).

Environment:
  TGVKV_CUDA=0|1     force the CUDA kernels off / on (default: on when torch is a CUDA build
                     and nvcc is found; never decided from a visible GPU).
  TGVKV_CUDA_ARCHS   nvcc targets: either raw flags ("-gencode=arch=compute_90a,code=sm_90a ...")
                     or a list of archs ("90a;80;80+PTX"). Default: sm_90a, sm_80 and PTX 8.0.
  MAX_JOBS=N         bounds parallel compiles (the C++ flags include -g0: half the build time).

CPU kernels: csrc/cpu/kernels/*.cpp are compiled once per CPU capability (as ATen compiles its
native/cpu kernels: -DCPU_CAPABILITY=X -DCPU_CAPABILITY_X plus that ISA's flags) and chosen at
runtime (csrc/cpu/kernels.h), so one binary is fast on AVX2, AVX-512 and ARM machines alike.
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ("-gencode=arch=compute_90a,code=sm_90a "
                 "-gencode=arch=compute_80,code=sm_80 "
                 "-gencode=arch=compute_80,code=compute_80")


# CPU capabilities the csrc/cpu/kernels/ sources are compiled for: (name, extra flags). DEFAULT
# first: it is linked first, so the linker keeps its copy of any inline function the capability
# objects share (an AVX-512 copy must never serve a DEFAULT caller).
if re.match(r"(x86_64|amd64|AMD64)$", __import__("platform").machine()):
    CPU_CAPABILITIES = [
        ("DEFAULT", []),
        ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
        ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
    ]
else:  # aarch64 (NEON through at::vec's DEFAULT), ppc64le, s390x, ...
    CPU_CAPABILITIES = [("DEFAULT", [])]


def _rel_glob(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _want_cuda(cu_sources):
    env = os.environ.get("TGVKV_CUDA", "").strip()
    if env == "0":
        return False
    if env == "1":
        if not torch.version.cuda:
            raise RuntimeError("TGVKV_CUDA=1 but the installed torch (%s) is not a CUDA build"
                               % torch.__version__)
        if not _find_nvcc():
            raise RuntimeError("TGVKV_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        if not cu_sources:
            raise RuntimeError("TGVKV_CUDA=1 but csrc/cuda/ has no .cu sources")
        return True
    if env:
        raise RuntimeError("TGVKV_CUDA must be 0 or 1, got %r" % env)
    return bool(torch.version.cuda) and _find_nvcc() is not None and bool(cu_sources)


def _arch_flags():
    spec = os.environ.get("TGVKV_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    if spec.startswith("-"):
        return spec.split()
    flags = []
    for a in re.split(r"[;,\s]+", spec):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.replace("+PTX", "").replace(".", "").replace("sm_", "").replace("compute_", "")
        flags.append("-gencode=arch=compute_%s,code=sm_%s" % (a, a))
        if ptx:
            flags.append("-gencode=arch=compute_%s,code=compute_%s" % (a, a))
    return flags


# Optional parts. `pip install tgvkv` gives the ops and the policies (tgvkv, tgvkv.ops,
# tgvkv.policy, tgvkv.presses, tgvkv.torch_impl); the extras add the rest. CI reads the oldest
# supported transformers from the pin below (regex `transformers>=([0-9.]+)`).
TRANSFORMERS = "transformers>=5.17,<=5.25.0"
EXTRAS = {
    "hf": [TRANSFORMERS],                               # tgvkv.hf, tgvkv.testing, generate bench
    "eval": [TRANSFORMERS, "easy-vqa", "pillow"],       # tgvkv.eval: tiny VLM on easy-VQA
    "plot": ["matplotlib"],                             # tgvkv-bench --plot
}
# pytest < 9.2: pytest 9.2's structured node ids make pytest-xdist 3.8's `--dist loadgroup` a
# silent no-op (pytest-dev/pytest-xdist#1386, fix unreleased): each grouped module's fixture (the
# GPU-check dry run, the emulator, the tiny trainings) is then built on every worker.
EXTRAS["test"] = sorted(set(sum(EXTRAS.values(), [])) |
                        {"pytest>=8,<9.2", "pytest-xdist", "hypothesis"})


# TGVKV_SANITIZE=address,undefined (any -fsanitize= list): build the C++ sources with those
# sanitizers, frame pointers and debug info, at -O1 (README "Sanitizer build" says how to run).
SANITIZE = os.environ.get("TGVKV_SANITIZE", "").strip()
if SANITIZE and not all(re.fullmatch(r"[a-z][a-z0-9-]*", x) for x in SANITIZE.split(",")):
    raise SystemExit(f"TGVKV_SANITIZE must be a comma-separated -fsanitize= list such as "
                     f"'address,undefined', got {SANITIZE!r}")


def _extension():
    cpp_sources = _rel_glob("csrc/*.cpp") + _rel_glob("csrc/cpu/*.cpp")
    cu_sources = _rel_glob("csrc/cuda/*.cu")
    with_cuda = _want_cuda(cu_sources)
    archs = _arch_flags() if with_cuda else []
    archs_str = " ".join(archs)
    macros = [
        ("TGVKV_VERSION", '"%s"' % VERSION),
        ("TGVKV_TORCH_VERSION", '"%s"' % torch.__version__),
        ("TGVKV_CUDA_ARCHS", '"%s"' % archs_str),
    ]
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    if SANITIZE:  # README "Sanitizer build": instrument the extension's own code
        # -fno-wrapv: Python's CFLAGS (which extension builds inherit) carry -fwrapv, under which
        # signed overflow is defined and UBSan does not instrument it; we want it reported.
        san = ["-fsanitize=" + SANITIZE, "-fno-omit-frame-pointer", "-g", "-fno-wrapv"]
        cxx = ["-O1" if c == "-O3" else c for c in cxx if c != "-g0"] + san
        link += san
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        macros.append(("TGVKV_WITH_CUDA", "1"))
        nvcc = ["-O3", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "--expt-relaxed-constexpr",
                "-lineinfo"] + archs
        return CUDAExtension(
            "tgvkv._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link)
    return CppExtension(
        "tgvkv._C", cpp_sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=link)


class _BuildExt(BuildExtension):
    """BuildExtension + the per-CPU-capability objects of csrc/cpu/kernels/*.cpp."""

    def build_extension(self, ext):
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) \
            else list(ext.extra_compile_args)
        post = {"cxx": None, "nvcc": []}
        objects = []
        for cap, flags in CPU_CAPABILITIES:
            macros = list(ext.define_macros) + [("CPU_CAPABILITY", cap)]
            if cap != "DEFAULT":
                macros.append(("CPU_CAPABILITY_" + cap, None))
            post["cxx"] = cxx + flags
            objects += self.compiler.compile(
                _rel_glob("csrc/cpu/kernels/*.cpp"),
                output_dir=os.path.join(self.build_temp, "cpu_capability_" + cap),
                macros=macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=dict(post) if isinstance(ext.extra_compile_args, dict)
                else post["cxx"], depends=ext.depends)
        # DEFAULT's object right after the extension's own objects (see CPU_CAPABILITIES)
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


setup(
    name="tgvkv",
    version=VERSION,
    description="TGV-KV: text-grounded KV-cache eviction for vision-language models "
                "(fused C++/CUDA kernels + Hugging Face integration)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src", include=["tgvkv", "tgvkv.*"]),
    include_package_data=True,
    package_data={"tgvkv": ["data/**/*", "data/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
    install_requires=["torch>=2.11", "numpy", "tqdm"],  # the ops and the policies
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tgvkv-bench = tgvkv.bench.cli:main"]},
    zip_safe=False,
)
