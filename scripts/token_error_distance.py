"""How far off are the shipped RSD head's wrong tokens? Greedy codes vs the tokenized chunk on the held-out
episodes of its training run (results/learned/training/dart/train.json), per layer: exact / off by one level / more.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/token_error_distance.py [DEMO_DIR]   # default runs/demos

DEMO_DIR holds libero_spatial.hdf5, libero_object.hdf5 and their *_dart.hdf5 (full or slimmed files).
"""
import sys
import json, numpy as np, torch
DEMO_DIR = sys.argv[1] if len(sys.argv) > 1 else "runs/demos"
from rsd.sim.demos import read_demos
from rsd.policy import load_policy
from rsd.train.policy_data import build_policy_data
from rsd.action_space import ActionSpace
pol = load_policy('rsd/assets/policies/lowdim_rsd')
rep = json.load(open('results/learned/training/dart/train.json'))
val = set(rep['split']['val'])
demos = []
for f in ['libero_spatial', 'libero_object', 'libero_spatial_dart', 'libero_object_dart']:
    for d in read_demos(f'{DEMO_DIR}/{f}.hdf5'):
        if f'{f}.hdf5:{d.name}' in val: demos.append(d)
print(len(demos))
space = ActionSpace.load('rsd/assets/tokenizer_libero')
data = build_policy_data(demos, pol.tokenizer, space, word_buckets=pol.backbone.word_buckets)
rows = np.arange(len(data))
dist = np.zeros((8, 7)); 
with torch.inference_mode():
    for i in range(0, len(rows), 2048):
        x, a, c = data.batch(rows[i:i+2048])
        h = pol.backbone.forward_inputs(x)
        g, _ = pol.head.rollout(pol.head.start(h), validate=False)
        d = (g - c).abs()
        for l in range(8):
            dist[l] += np.bincount(d[:, l].flatten().numpy(), minlength=7)[:7]
for l in range(8):
    p = dist[l] / dist[l].sum()
    print(l, 'exact %.3f, off by 1 %.3f, off by >=2 %.3f' % (p[0], p[1], p[2:].sum()))
