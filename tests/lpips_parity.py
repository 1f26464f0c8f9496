"""LPIPS parity against the lpips package: our PyTorch reference and an exported float32 model.

usage: PYTHONPATH=src python tests/lpips_parity.py [TRUNK.pth MODEL.onnx]

Without arguments: builds lpips.LPIPS(net='vgg', pnet_rand=True) after torch.manual_seed(16)
(as the tests' lpips_pkg fixture), saves its trunk as a torchvision-format state dict and
exports graph="lpips" (spatial, grad, inputs in [-1, 1]) into a temporary folder first.
Prints max |ours - lpips| / max |lpips| per output on a seeded batch of 3 at 67x93.
"""
import os, sys, tempfile, warnings
import numpy as np, torch, lpips
from perceptual_engine import Engine, export_onnx, lpips as L
from perceptual_engine.reference import TorchLPIPS
torch.manual_seed(16)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pkg = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
if len(sys.argv) == 3:
    trunk, model = sys.argv[1:3]
    state = torch.load(trunk, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p in pkg.net.named_parameters():
            _, i, kind = name.split("."); p.copy_(state[f"features.{i}.{kind}"])
else:
    folder = tempfile.mkdtemp()
    trunk, model = os.path.join(folder, "trunk.pth"), os.path.join(folder, "lpips.onnx")
    torch.save({f"features.{n.split('.')[1]}.{n.split('.')[2]}": p.detach().clone()
                for n, p in pkg.net.named_parameters()}, trunk)
    export_onnx(L.default_spec(trunk, input_range="-1,1"), model, graph="lpips", spatial=True, grad=True)
spec = L.default_spec(trunk, input_range="-1,1")
g = torch.Generator().manual_seed(0)
x, y = (torch.rand(3, 3, 67, 93, generator=g) * 2 - 1 for _ in range(2))
xa = x.clone().requires_grad_()
total, per = pkg(xa, y, retPerLayer=True)
total.sum().backward()
pkg.spatial = True
with torch.no_grad():
    want = {f"lpips.{n}": p.flatten() for n, p in zip(L.LAYERS, per)}
    want["total"] = total.flatten(); want["spatial"] = pkg(x, y)
want["grad.x"] = xa.grad
with torch.no_grad():
    ref = TorchLPIPS(spec, spatial=True)(x, y)
onnx = Engine(model, "cpu").distance(x.numpy(), y.numpy())
rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b.detach().double().numpy()).max() / b.detach().abs().max())
print("| output | PyTorch reference | ONNX float32 |\n|---|---|---|")
for k, v in want.items():
    r = f"{rel(ref[k], v):.1e}" if k in ref else "(autograd, not compared)"
    print(f"| {k} | {r} | {rel(onnx[k], v):.1e} |")
