"""Environment facts recorded in every ``tgvkv-bench`` report: device, CPU, versions."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """``family F model M`` of /proc/cpuinfo (x86; "?" elsewhere): the model name alone, e.g.
    "AMD EPYC" on a VM, does not tell Zen 3 (AVX2) from Zen 5 (AVX-512)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key = ln.split(":", 1)[0].strip()
                if key in ("cpu family", "model") and key not in fields:
                    fields[key] = ln.split(":", 1)[1].strip()
                if len(fields) == 2:
                    break
    except OSError:
        pass
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty where
    it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith(("flags", "Features")):
                    return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_info(device: str) -> dict:
    info = {"device": device, "cpu": cpu_model(), "cpu_id": cpu_id(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except Exception:
        v["transformers"] = None
    try:
        import tgvkv

        v["tgvkv"] = getattr(tgvkv, "__version__", None)
        bi = getattr(tgvkv, "build_info", None)
        if callable(bi):
            try:
                v["tgvkv_build"] = {k: (x if isinstance(x, (str, int, float, bool, type(None), list))
                                        else str(x)) for k, x in dict(bi()).items()}
            except Exception as e:  # build info is informative only
                v["tgvkv_build"] = f"unavailable: {e}"
    except Exception:
        v["tgvkv"] = None
    return v

