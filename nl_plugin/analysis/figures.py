"""PNG figures of attention maps, N3 neighbour weights and training curves (matplotlib, no display needed).

Layouts are in whole pixels (panels of ``PANEL`` px, a colour-bar column of ``CBAR`` px, a title band of
``TITLE`` px), so a figure's size follows from what it shows. Each drawing function returns the size and
the weight arrays it drew, so that what is seen can be checked.
"""
import numpy as np

PANEL, CBAR, TITLE, DPI = 128, 56, 28, 100


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _axes(fig, row, col, size):
    """Axes of panel (row, col) in a figure of ``size`` = (height, width) pixels."""
    h, w = size
    left, top = col * PANEL + 4, TITLE + row * PANEL + 14
    ax = fig.add_axes([left / w, 1 - (top + PANEL - 18) / h, (PANEL - 8) / w, (PANEL - 18) / h])
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _colorbar(fig, mappable, row, cols, size):
    h, w = size
    top = TITLE + row * PANEL + 14
    cax = fig.add_axes([(cols * PANEL + 6) / w, 1 - (top + PANEL - 18) / h, 10 / w, (PANEL - 18) / h])
    bar = fig.colorbar(mappable, cax=cax)
    bar.ax.tick_params(labelsize=6)


def _gray(image):
    img = np.asarray(image, dtype=np.float32)
    return img if img.ndim == 2 else img.mean(-1)


def _show(ax, image, extent=None):
    img = np.asarray(image, dtype=np.float32)
    kw = {'cmap': 'gray'} if img.ndim == 2 else {}
    ax.imshow(np.clip(img, 0, 1), vmin=0, vmax=1, interpolation='nearest', extent=extent, **kw)


def _box(ax, top, left, height, width, color):
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor=color, linewidth=0.8))


def _save(fig, path, title, size):
    if title:
        fig.text(0.5, 1 - 4 / size[0], title, ha='center', va='top', fontsize=8)
    fig.savefig(path, dpi=DPI)
    return size


def attention_figure(image, attentions, path, title=None, labels=None, cmap='inferno'):
    """Attention of each query pixel at every non-local step, drawn over the image (NLRN paper, Fig. 4).

    One row per pixel (and a second one, "step alone", when the network propagates correlations): the
    whole image with the query (cross) and its key window (box), then one panel per step showing the
    weights over the key window on the gray image, with a colour bar per row.

    Args:
        image (ndarray): (H, W) or (H, W, 3) in [0, 1], the network input.
        attentions (list[PixelAttention]): From :func:`nlrn_attention` / :func:`block_attention`.
        path (str): Output PNG.
        title (str, optional): Figure title.
        labels (list[str], optional): A label per entry of ``attentions`` (e.g. which model).

    Returns:
        dict: ``size`` (height, width) in pixels and ``drawn``: per pixel, per row, the (S, h, w) arrays drawn.
    """
    hw = np.asarray(image).shape[:2]
    rows = [(i, pa, which) for i, pa in enumerate(attentions) for which in ('weights', 'step_weights')
            if getattr(pa, which) is not None]
    cols = 1 + max(len(pa.steps) for pa in attentions)
    size = (TITLE + len(rows) * PANEL, cols * PANEL + CBAR)
    fig = _figure(size[1], size[0])
    drawn = [[] for _ in attentions]
    for r, (i, pa, which) in enumerate(rows):
        y0, y1 = int(pa.rows.min()), int(pa.rows.max()) + 1
        x0, x1 = int(pa.cols.min()), int(pa.cols.max()) + 1
        maps = pa.full_map(which, hw)[:, y0:y1, x0:x1].numpy()
        drawn[i].append(maps)
        ax = _axes(fig, r, 0, size)
        _show(ax, image)
        _box(ax, y0, x0, y1 - y0, x1 - x0, 'cyan')
        ax.plot([pa.pixel[1]], [pa.pixel[0]], marker='+', color='red', markersize=6)
        label = ('' if labels is None else f'{labels[i]} ') + ('attention' if which == 'weights' else 'step alone')
        ax.set_title(f'({pa.pixel[0]}, {pa.pixel[1]}) {label}', fontsize=6)
        # one colour scale per row (its colour bar): the weights' range over all steps, so sharpening shows
        vmin, vmax = float(maps.min()), float(maps.max())
        for s, t in enumerate(pa.steps):
            ax = _axes(fig, r, 1 + s, size)
            _show(ax, _gray(image)[y0:y1, x0:x1])
            im = ax.imshow(maps[s], cmap=cmap, alpha=0.7, vmin=vmin, vmax=max(vmax, vmin + 1e-12),
                           interpolation='nearest')
            ax.plot([pa.pixel[1] - x0], [pa.pixel[0] - y0], marker='+', color='cyan', markersize=4)
            if r == 0:
                ax.set_title(f'step {t + 1}', fontsize=6)
        _colorbar(fig, im, r, cols, size)
    return {'size': _save(fig, path, title, size), 'drawn': drawn}


def n3_figure(image, neighbours, path, title=None, cmap='inferno'):
    """The k neighbour weights of each query patch on the image, and the block's temperature map.

    One row per query: the image with the query patch (red) and its search region (cyan), then one
    panel per neighbour: each candidate patch's weight spread over its pixels, on the zero-padded image
    around the search region. Last row: the per-patch temperature T over the image.

    Args:
        image (ndarray): (H, W) or (H, W, 3) in [0, 1] at the block input's size.
        neighbours (list[PatchNeighbours]): From :func:`n3_neighbours`.
        path (str): Output PNG.

    Returns:
        dict: ``size`` and ``drawn``: per query the (k, h, w) maps drawn (each sums to one).
    """
    k = neighbours[0].weights.shape[0]
    temp = neighbours[0].temperature
    rows = len(neighbours) + (temp is not None)
    cols = 1 + k
    size = (TITLE + rows * PANEL, cols * PANEL + CBAR)
    fig = _figure(size[1], size[0])
    left, right, top, bottom = neighbours[0].pad
    canvas = np.pad(np.asarray(image, dtype=np.float32), [(top, bottom), (left, right)] + [(0, 0)] *
                    (np.asarray(image).ndim - 2))
    drawn = []
    for r, nb in enumerate(neighbours):
        p = nb.patch_size
        boxes = np.array([nb.patch_box(i) for i in nb.candidates.tolist()]) + [top, left]
        y0, x0 = boxes.min(0)
        y1, x1 = boxes.max(0) + p
        maps = nb.weight_maps().numpy()[:, y0:y1, x0:x1]
        drawn.append(maps)
        ax = _axes(fig, r, 0, size)
        _show(ax, canvas)
        qy, qx = np.array(nb.patch_box(nb.query)) + [top, left]
        _box(ax, y0, x0, y1 - y0, x1 - x0, 'cyan')
        _box(ax, qy, qx, p, p, 'red')
        ax.set_title(f'patch at ({nb.pixel[0]:.0f}, {nb.pixel[1]:.0f})', fontsize=6)
        vmax = float(maps.max()) or 1.0
        for j in range(k):
            ax = _axes(fig, r, 1 + j, size)
            _show(ax, _gray(canvas)[y0:y1, x0:x1])
            im = ax.imshow(maps[j], cmap=cmap, alpha=0.75, vmin=0, vmax=vmax, interpolation='nearest')
            _box(ax, qy - y0, qx - x0, p, p, 'red')
            if r == 0:
                ax.set_title(f'neighbour {j + 1}', fontsize=6)
        _colorbar(fig, im, r, cols, size)
    if temp is not None:
        ax = _axes(fig, rows - 1, 0, size)
        nb = neighbours[0]
        h, w = canvas.shape[:2]
        im = ax.imshow(temp.numpy(), cmap='viridis', extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation='nearest')
        ax.set_title('temperature T per patch', fontsize=6)
        _colorbar(fig, im, rows - 1, 1, size)
    return {'size': _save(fig, path, title, size), 'drawn': drawn}


def curve_figures(curves, out_dir, prefix=''):
    """``loss.png`` (every loss, log scale) and one ``<metric>.png`` per validation metric (a line per dataset).

    Args:
        curves (dict): From :func:`nl_plugin.analysis.curves.parse_train_log` / ``read_tensorboard``.
        out_dir (str): Output folder (created).
        prefix (str): File-name prefix.

    Returns:
        dict: file name -> (height, width) in pixels.
    """
    import os
    os.makedirs(out_dir, exist_ok=True)
    out = {}
    by_metric = {}
    for key, series in curves['metric'].items():
        dataset, metric = key.rsplit('/', 1)
        by_metric.setdefault(metric, {})[dataset] = series
    plots = ([('loss', curves['loss'], 'loss')] if curves['loss'] else []) + \
        [(m, series, m.upper() if m in ('psnr', 'ssim') else m) for m, series in sorted(by_metric.items())]
    for name, lines, ylabel in plots:
        fig = _figure(640, 400)
        ax = fig.add_axes([0.11, 0.13, 0.85, 0.8])
        for label, series in sorted(lines.items()):
            if series:
                it, val = zip(*series)
                ax.plot(it, val, marker='.' if len(it) < 30 else None, linewidth=1, label=label)
        if name == 'loss' and all(v > 0 for s in lines.values() for _, v in s):
            ax.set_yscale('log')
        ax.set_xlabel('iteration', fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        file = f'{prefix}{name}.png'
        fig.savefig(os.path.join(out_dir, file), dpi=DPI)
        out[file] = (400, 640)
    return out


__all__ = ['attention_figure', 'n3_figure', 'curve_figures', 'PANEL', 'CBAR', 'TITLE']
