"""One progressive-shrinking step (teacher + 4 subnets of the OFA MobileNetV3 w1.2 space) against its ideal, and
against the reference implementation's step for the same subnets, batch and weights."""
from harness import Row, PSStep, build_space

IDEAL_TARGET = 1.02
REFERENCE_TARGET = 1.0  # faster than the reference
ROUNDS = 7


def test_ps_step(benchmark, settings, measure, record, tmp_path):
    space = build_space('ofa_mbv3_w12', settings.res)  # its own: the steps train it
    ps = PSStep(space, settings.batch, settings.res, settings.precision, output=str(tmp_path))
    ps.check()  # from the same weights, the three steps compute the same mean loss

    benchmark.group = 'PS step'
    t = measure(ps.functions(), settings.rounds(ROUNDS), warmup=1)
    note = f'{t["ours"] * 1e3:.0f} ms vs ideal {t["ideal"] * 1e3:.0f} ms'
    record(Row('PS step / ideal, ofa_mbv3_w12, 4 subnets', t['ours'] / t['ideal'], IDEAL_TARGET, note=note,
               reference=t['reference'] / t['ideal'] if 'reference' in t else None))
    if 'reference' in t:
        record(Row('PS step / reference PS step, ofa_mbv3_w12, 4 subnets', t['ours'] / t['reference'],
                   REFERENCE_TARGET, note=f'reference {t["reference"] * 1e3:.0f} ms'))
