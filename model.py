"""The networks: `Net`, the assignment's model layer for layer; `CompactNet`, under 8,000 parameters; `FastNet`, 99% in
one epoch of seconds on a CPU. Each returns log-probabilities [batch, 10]."""
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """4 convolutions, 2 linear layers, log-probabilities out: 593,200 parameters.

    The attribute names are the original's, so a state_dict saved by either loads into the other with strict=True.
    Comments give each layer's output (channels x height x width) and receptive field (RF) on the 28x28 input.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)     # 32x26x26, RF 3
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)    # 64x24x24, RF 5; max-pool -> 64x12x12, RF 6
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3)   # 128x10x10, RF 10
        self.conv4 = nn.Conv2d(128, 256, kernel_size=3)  # 256x8x8, RF 14; max-pool -> 256x4x4, RF 16
        self.fc1 = nn.Linear(4096, 50)                   # 256*4*4 = 4096 -> 50
        self.fc2 = nn.Linear(50, 10)                     # 10 digit classes

    def forward(self, x):
        # ReLU after the pooling gives the same result as before it, on a quarter of the values; in place, since
        # nothing else reads the pre-activation values (about 3% faster on CPU).
        x = F.relu(self.conv1(x), inplace=True)
        x = F.relu(F.max_pool2d(self.conv2(x), 2), inplace=True)
        x = F.relu(self.conv3(x), inplace=True)
        x = F.relu(F.max_pool2d(self.conv4(x), 2), inplace=True)
        x = x.flatten(1)
        x = F.relu(self.fc1(x), inplace=True)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class CompactNet(nn.Module):
    """7,702 parameters: six Conv-BatchNorm-ReLU blocks, one max-pool, global average pooling, a 1x1 classifier.

    The convolutions have no bias, since the BatchNorm after each adds one. A 1x1 transition after the pool cuts
    the channels cheaply; global average pooling and a 1x1 convolution replace Net's 204,850-weight fc1.
    Comments give each layer's output (channels x height x width) and receptive field (RF) on the 28x28 input.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = _conv_bn_relu(1, 10, 3)    # 10x26x26, RF 3
        self.conv2 = _conv_bn_relu(10, 14, 3)   # 14x24x24, RF 5; max-pool -> 14x12x12, RF 6
        self.trans = _conv_bn_relu(14, 10, 1)   # 10x12x12, RF 6: fewer channels, same field
        self.conv3 = _conv_bn_relu(10, 14, 3)   # 14x10x10, RF 10
        self.conv4 = _conv_bn_relu(14, 16, 3)   # 16x8x8, RF 14
        self.conv5 = _conv_bn_relu(16, 18, 3)   # 18x6x6, RF 18; average pool -> 18x1x1, the whole image
        self.classifier = nn.Conv2d(18, 10, kernel_size=1, bias=False)  # 10x1x1: a score per digit

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        x = self.trans(F.max_pool2d(x, 2))
        x = self.conv5(self.conv4(self.conv3(x)))
        x = self.classifier(F.adaptive_avg_pool2d(x, 1))
        return F.log_softmax(x.flatten(1), dim=1)


class FastNet(nn.Module):
    """Two strided Conv-BatchNorm-ReLU blocks and two linear layers, the first batch-normalized too: few, large
    operations, which a CPU runs near its peak, where CompactNet's many thin ones leave it waiting. One epoch of it
    takes seconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = _conv_bn_relu(1, 16, 5, stride=2)   # 16x12x12, RF 5
        self.conv2 = _conv_bn_relu(16, 64, 3, stride=2)  # 64x5x5, RF 9
        self.fc1 = nn.Sequential(nn.Linear(1600, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(inplace=True))
        self.fc2 = nn.Linear(128, 10)                     # 10 digit classes

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        return F.log_softmax(self.fc2(self.fc1(x.flatten(1))), dim=1)


def _conv_bn_relu(in_channels, out_channels, kernel_size, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


# The models main_mnist.py, predict.py and app.py can build, by the name --model takes and run.json records.
# FastNet12 is FastNet's network under a recipe of its own (main_mnist.py's RECIPES).
MODELS = {"Net": Net, "CompactNet": CompactNet, "FastNet": FastNet, "FastNet12": FastNet}
