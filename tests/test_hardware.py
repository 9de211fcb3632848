from models.hardware import cpu_info, parse_cpuinfo

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R45
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R45
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_bf16_is_read_from_the_flags_not_assumed():
    epyc = parse_cpuinfo(CPUINFO)
    assert epyc.model == "AMD EPYC 9R45"
    assert epyc.has_bf16 and not epyc.has_amx
    older = parse_cpuinfo(CPUINFO.replace(" avx512_bf16", ""))
    assert not older.has_bf16
    assert epyc.key() != older.key()  # a cached per-machine choice must not carry over
    assert "avx512_bf16" in epyc.summary() and "AMD EPYC 9R45" in epyc.summary()


def test_this_machine_is_described():
    info = cpu_info()
    assert info.model and len(info.key()) == 12
