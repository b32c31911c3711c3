"""torch.compile (inductor) vs eager at nano size, dense vs AdaptiVision (docs/performance.md).

    .venv/bin/python benchmarks/compile_nano.py
"""
import torch, timm, adaptivision, time, statistics as st
from adaptivision.benchmark import mixed_batch
torch.manual_seed(0)
x = mixed_batch(64, 1, 28)
m = timm.create_model('adaptivision_nano_patch4_28')
m.train()
with torch.no_grad(): m(x)
m.eval()
d = timm.create_model('adaptivision_nano_patch4_28', reduction='none').eval()
with torch.inference_mode():
    ref = m(x)
    t=time.time(); cm = torch.compile(m); out = cm(x); print('compile+first', time.time()-t, 'err', (out-ref).abs().max().item())
    cd = torch.compile(d); cd(x)
    for b in (-1, 1): m.set_token_budget(bias=b); cm(x)
    m.set_token_budget(bias=0.0); cm(x)
    ts = {k: [] for k in ('dense', 'dense_c', 'av', 'av_c')}
    for _ in range(15):
        for k, f in (('dense', d), ('dense_c', cd), ('av', m), ('av_c', cm)):
            t=time.perf_counter(); f(x); ts[k].append(time.perf_counter()-t)
    print({k: round(st.median(v)*1e3, 1) for k, v in ts.items()})
