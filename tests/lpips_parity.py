"""LPIPS parity against the lpips package: our PyTorch reference and an exported float32 model.

usage: PYTHONPATH=src python tests/lpips_parity.py [--net vgg|alex|squeeze] [TRUNK.pth MODEL.onnx]

Without files: builds lpips.LPIPS(net=NET, pnet_rand=True) after torch.manual_seed(16)
(as the tests' lpips_pkg fixture for vgg), saves its trunk as a torchvision-format state dict
and exports graph="lpips" (spatial, grad, inputs in [-1, 1]) into a temporary folder first.
Prints max |ours - lpips| / max |lpips| per output on a seeded batch of 3 at 67x93; grad.x
against the package's autograd in float32 and in float64.
"""
import os, sys, tempfile, warnings
import numpy as np, torch, lpips
from perceptual_engine import Engine, export_onnx, lpips as L
from perceptual_engine.lpips import TorchLPIPS
args = sys.argv[1:]
net = "vgg"
if args[:1] == ["--net"]:
    net, args = args[1], args[2:]
torch.manual_seed(16)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pkg = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
key = lambda n: "features.{}.{}".format(*n.split(".", 2)[1:])  # "slice2.5.weight" -> features.5.weight
if len(args) == 2:
    trunk, model = args
    state = torch.load(trunk, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p in pkg.net.named_parameters():
            p.copy_(state[key(name)])
else:
    folder = tempfile.mkdtemp()
    trunk, model = os.path.join(folder, "trunk.pth"), os.path.join(folder, "lpips.onnx")
    torch.save({key(n): p.detach().clone() for n, p in pkg.net.named_parameters()}, trunk)
    export_onnx(L.default_spec(trunk, net=net, input_range="-1,1"), model, graph="lpips", spatial=True, grad=True)
spec = L.default_spec(trunk, net=net, input_range="-1,1")
g = torch.Generator().manual_seed(0)
x, y = (torch.rand(3, 3, 67, 93, generator=g) * 2 - 1 for _ in range(2))
xa = x.clone().requires_grad_()
total, per = pkg(xa, y, retPerLayer=True)
total.sum().backward()
x64 = x.double().requires_grad_()
pkg.double()(x64, y.double()).sum().backward()
pkg.float()
pkg.spatial = True
with torch.no_grad():
    want = {f"lpips.{n}": p.flatten() for n, p in zip(spec.layers, per)}
    want["total"] = total.flatten(); want["spatial"] = pkg(x, y)
want["grad.x"] = xa.grad
with torch.no_grad():
    ref = TorchLPIPS(spec, spatial=True)(x, y)
onnx = Engine(model, "cpu").distance(x.numpy(), y.numpy())
rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b.detach().double().numpy()).max() / b.detach().abs().max())
print(f"net {net}\n| output | PyTorch reference | ONNX float32 |\n|---|---|---|")
for k, v in want.items():
    r = f"{rel(ref[k], v):.1e}" if k in ref else "(autograd, not compared)"
    print(f"| {k} | {r} | {rel(onnx[k], v):.1e} |")
print(f"| grad.x vs float64 autograd | | {rel(onnx['grad.x'], x64.grad):.1e} |")
