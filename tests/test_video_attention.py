"""eval_video_segmentation.py, visualize_attention.py, video_generation.py and utils' attention maps."""
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import eval_video_segmentation as evs
import evaluation
import outputdir
import utils
from conftest import run_script

ARCH = ['--arch', 'vit_tiny', '--patch_size', '16', '--device', 'cpu']


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A seeded, untrained vit_tiny/16 backbone: its features are mostly colour and texture, enough to track."""
    torch.manual_seed(0)
    model, _ = utils.build_backbone('vit_tiny', 16)
    path = tmp_path_factory.mktemp('weights') / 'vit_tiny16.pth'
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def model(weights):
    model, _ = utils.build_backbone('vit_tiny', 16)
    model.load_state_dict(torch.load(weights))
    return model.eval()


def last_error_line(proc):
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


# ============ DAVIS: a synthetic sequence in the DAVIS 2017 layout ============

def write_davis_video(root, name, n_frames=6, size=64, seed=0):
    """A red disk moving right and a blue square moving left over a fixed textured background.

    Returns the ground-truth label maps (1 = disk, 2 = square); every frame is annotated.
    """
    rng = np.random.default_rng(seed)
    coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    background = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) * 0.6 + 40
    background = np.clip(background + rng.normal(0, 12, background.shape), 0, 255)
    yy, xx = np.mgrid[:size, :size]
    for folder in (f'JPEGImages/480p/{name}', f'Annotations/480p/{name}', 'ImageSets/2017'):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labels_per_frame = []
    for t in range(n_frames):
        image, labels = background.copy(), np.zeros((size, size), np.uint8)
        disk = (xx - (12 + 8 * t)) ** 2 + (yy - 16) ** 2 <= 7 ** 2
        square = (np.abs(xx - (52 - 8 * t)) <= 6) & (np.abs(yy - 46) <= 6)
        image[disk], labels[disk] = (230, 30, 30), 1
        image[square], labels[square] = (30, 60, 230), 2
        Image.fromarray(image.astype(np.uint8)).save(root / f'JPEGImages/480p/{name}/{t:05d}.jpg', quality=95)
        evs.imwrite_indexed(root / f'Annotations/480p/{name}/{t:05d}.png', labels, evs.davis_palette())
        labels_per_frame.append(labels)
    with open(root / 'ImageSets/2017/val.txt', 'a') as f:
        f.write(name + '\n')
    return labels_per_frame


def test_propagation_writes_davis_masks_and_beats_copying_the_first_mask(tmp_path, weights):
    gt = write_davis_video(tmp_path / 'davis', 'shapes')
    out = tmp_path / 'out'
    proc = run_script('eval_video_segmentation.py', *ARCH, '--pretrained_weights', weights,
                      '--data_path', tmp_path / 'davis', '--output_dir', out)
    assert 'DAVIS 2017 over 1 videos: J&F-Mean' in proc.stdout

    palette = evs.davis_palette().ravel().tolist()
    predictions = []
    for t in range(6):
        with Image.open(out / 'shapes' / f'{t:05d}.png') as img:
            assert img.mode == 'P' and img.size == (64, 64)
            assert img.getpalette()[:len(palette)] == palette
            predictions.append(np.array(img))
    assert list(palette[3:6]) == [128, 0, 0] and list(palette[6:9]) == [0, 128, 0]
    np.testing.assert_array_equal(predictions[0], gt[0])
    assert set(np.unique(np.concatenate(predictions))) <= {0, 1, 2}

    metrics = json.loads((out / 'metrics.json').read_text())
    gt_paths = [tmp_path / 'davis' / f'Annotations/480p/shapes/{t:05d}.png' for t in range(1, 5)]
    rescored = evs.evaluate_video(gt_paths, predictions[1:5], n_objects=2)  # first and last frames excluded
    assert metrics['videos']['shapes'] == rescored  # JSON floats round-trip exactly
    assert metrics['overall']['J&F-Mean'] == pytest.approx(rescored['J&F-Mean'])
    assert set(metrics['videos']['shapes']['objects']) == {'1', '2'}

    baseline = evs.evaluate_video(gt_paths, [gt[0]] * 4, n_objects=2)
    assert baseline['J&F-Mean'] < 0.25
    assert metrics['overall']['J&F-Mean'] > 0.7
    assert metrics['overall']['J&F-Mean'] > baseline['J&F-Mean'] + 0.45


def test_j_and_f_against_hand_computed_values():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    shifted_3 = np.roll(gt, 3, axis=1)  # columns 5..8
    # J: the squares share one column of 4 pixels; union 16 + 16 - 4 = 28.
    assert evs.db_eval_iou(gt, shifted_3) == pytest.approx(4 / 28)
    # Tolerance ceil(0.008 * hypot(10, 10)) = 1 pixel: a 3x3 cross. Each boundary has 16 pixels (the outer
    # top row and left column, the inner bottom row and right column, see the seg2bmap test); 9 of the
    # shifted boundary lie within the cross of the other (3 on the top row, 4 on its left column, 2 on its
    # bottom row) and symmetrically 9 of the original's: precision = recall = 9/16, so F = 9/16.
    assert evs.f_measure(shifted_3, gt) == pytest.approx(9 / 16)
    shifted_1 = np.roll(gt, 1, axis=1)
    assert evs.db_eval_iou(gt, shifted_1) == pytest.approx(12 / 20)
    assert evs.f_measure(shifted_1, gt) == pytest.approx(1.0)  # within the 1-pixel tolerance
    empty = np.zeros_like(gt)
    assert evs.db_eval_iou(empty, empty) == 1.0 and evs.f_measure(empty, empty) == 1.0
    assert evs.db_eval_iou(gt, empty) == 0.0 and evs.f_measure(empty, gt) == 0.0
    assert evs.f_measure(gt, empty) == 0.0
    # The tolerance grows with the image: 0.008 * hypot(200, 200) = 2.26 -> 3 pixels.
    big_gt = np.zeros((200, 200), bool)
    big_gt[50:150, 50:150] = True
    assert evs.f_measure(np.roll(big_gt, 3, axis=1), big_gt) == pytest.approx(1.0)
    assert evs.f_measure(np.roll(big_gt, 5, axis=1), big_gt) < 0.7


def test_seg2bmap_marks_the_davis_boundary():
    seg = np.zeros((8, 8), bool)
    seg[2:6, 2:6] = True
    expected = np.zeros_like(seg)
    expected[1, 1:6] = True   # outer row above (with the corner)
    expected[2:6, 1] = True   # outer column left
    expected[2:6, 5] = True   # inner right column
    expected[5, 2:6] = True   # inner bottom row
    np.testing.assert_array_equal(evs.seg2bmap(seg), expected)


def test_video_scores_average_objects_and_skip_first_and_last_frames(tmp_path):
    palette = evs.davis_palette()
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[:, 2:6, 2:6] = 1
    gt[:, 7:9, 7:9] = 2
    paths = []
    for t, labels in enumerate(gt):
        paths.append(tmp_path / f'{t:05d}.png')
        evs.imwrite_indexed(paths[-1], labels, palette)
    pred = gt.copy()
    pred[1][gt[1] == 2] = 0          # frame 1: object 2 missed (J = F = 0)
    pred[2][2:6, 5] = 0              # frame 2: object 1 loses a column (J = 12/16)
    scores = evs.evaluate_video(paths[1:3], pred[1:3], n_objects=2)
    assert scores['objects']['1']['J-Mean'] == pytest.approx((1 + 12 / 16) / 2)
    assert scores['objects']['2']['J-Mean'] == pytest.approx(0.5)
    assert scores['objects']['2']['F-Mean'] == pytest.approx(0.5)
    assert scores['J-Mean'] == pytest.approx(((1 + 12 / 16) / 2 + 0.5) / 2)
    assert scores['J&F-Mean'] == pytest.approx((scores['J-Mean'] + scores['F-Mean']) / 2)


def dense_label_propagation(feat_tar, feats, segs, h, w, size, topk):
    """The original's formulation: exp(cos / 0.1) affinities, a neighbourhood mask built by loops, all
    sources below the k-th largest per target zeroed, columns normalised, labels multiplied through."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(max(0, i - size), min(h, i + size + 1)):
                for q in range(max(0, j - size), min(w, j + size + 1)):
                    mask[i, j, p, q] = 1
    mask = mask.reshape(h * w, h * w)
    aff = torch.stack([torch.exp(feat_tar @ f.T / 0.1) * mask for f in feats])  # (ctx, tar, src)
    aff = aff.transpose(2, 1).reshape(-1, h * w)                                 # (ctx*src, tar)
    kth = aff.topk(topk, dim=0).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    labels = torch.cat([s.reshape(s.shape[1], -1).T for s in segs]).T          # (C, ctx*src)
    return (labels @ aff).reshape(1, -1, h, w)


def test_label_propagation_matches_the_dense_formulation(monkeypatch):
    torch.manual_seed(0)
    h, w, dim, channels = 5, 6, 16, 3
    feats = [torch.nn.functional.normalize(torch.randn(h * w, dim), dim=1) for _ in range(3)]
    feat_tar = torch.nn.functional.normalize(torch.randn(h * w, dim), dim=1)
    segs = [torch.rand(1, channels, h, w) for _ in range(3)]
    args = type('Args', (), {'topk': 5})()
    monkeypatch.setattr(evs, 'TARGET_CHUNK', 7)  # several chunks of target patches
    mask = evs.restrict_neighborhood(h, w, 2, torch.device('cpu'))
    ours = evs.label_propagation(args, feat_tar, feats, segs, mask)
    expected = dense_label_propagation(feat_tar, feats, segs, h, w, size=2, topk=5)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_frame_scaling_palette_and_mask_normalisation():
    assert evs.scaled_size(480, 854) == (480, 832)
    assert evs.scaled_size(854, 480) == (832, 480)
    assert evs.scaled_size(64, 96) == (480, 704)
    palette = evs.davis_palette()
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[8].tolist() == [64, 0, 0] and palette[255].tolist() == [224, 224, 192]
    mask = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[0., 0.], [0., 0.]], [[0.5, 0.5], [0.5, 0.5]]])
    normed = evs.norm_mask(mask)
    torch.testing.assert_close(normed[0], torch.tensor([[0., 0.25], [0.5, 1.]]))
    torch.testing.assert_close(normed[1:], mask[1:])  # empty and constant channels stay as they are


def test_davis_input_errors(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match=r'^error: .*ImageSets/2017/val.txt not found'):
        evs.list_videos(str(tmp_path / 'empty'))
    write_davis_video(tmp_path / 'davis', 'annotated', n_frames=2)
    write_davis_video(tmp_path / 'davis', 'unannotated', n_frames=2)
    (tmp_path / 'davis/Annotations/480p/unannotated/00000.png').unlink()
    with pytest.raises(SystemExit, match=r"^error: video 'unannotated' has no first-frame annotation .*00000.png"):
        evs.list_videos(str(tmp_path / 'davis'))


def test_a_run_that_stops_leaves_the_earlier_results_and_its_own_finished_videos_apart(tmp_path, weights, monkeypatch):
    write_davis_video(tmp_path / 'davis', 'first', n_frames=3)
    write_davis_video(tmp_path / 'davis', 'broken', n_frames=3, seed=1)
    out = tmp_path / 'out'
    (out / 'first').mkdir(parents=True)
    (out / 'first' / '00000.png').write_bytes(b'earlier mask')
    (out / 'metrics.json').write_text('{"earlier": true}')
    outputdir.record_written(out, ['first', 'metrics.json'])  # an earlier run's results
    read_frame = evs.read_frame

    def fails_on_broken(path):  # a frame whose header reads but whose pixels do not decode
        if 'broken' in path and path.endswith('00001.jpg'):
            utils.fail(f"cannot read frame {path}")
        return read_frame(path)
    monkeypatch.setattr(evs, 'read_frame', fails_on_broken)
    with pytest.raises(SystemExit, match=r'^error: cannot read frame .*broken/00001.jpg'):
        evs.main([*ARCH, '--pretrained_weights', str(weights), '--data_path', str(tmp_path / 'davis'),
                  '--output_dir', str(out)])
    assert (out / 'first' / '00000.png').read_bytes() == b'earlier mask'
    assert (out / 'metrics.json').read_text() == '{"earlier": true}'
    staged = out / evs.STAGING
    assert sorted(p.name for p in (staged / 'first').iterdir()) == ['00000.png', '00001.png', '00002.png']
    assert list(json.loads((staged / 'metrics.json').read_text())['videos']) == ['first']

    (tmp_path / 'davis/ImageSets/2017/val.txt').write_text('first\n')  # a run that completes replaces them
    evs.main([*ARCH, '--pretrained_weights', str(weights), '--data_path', str(tmp_path / 'davis'),
              '--output_dir', str(out)])
    assert sorted(p.name for p in out.iterdir() if p.name[0] != '.') == ['first', 'metrics.json']
    assert sorted(p.name for p in (out / 'first').iterdir()) == ['00000.png', '00001.png', '00002.png']
    assert list(json.loads((out / 'metrics.json').read_text())['videos']) == ['first']


def test_unreadable_frame_is_reported_before_anything_is_written(tmp_path, weights):
    write_davis_video(tmp_path / 'davis', 'first', n_frames=3)
    write_davis_video(tmp_path / 'davis', 'broken', n_frames=3, seed=1)
    (tmp_path / 'davis/JPEGImages/480p/broken/00001.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(SystemExit, match=r'^error: cannot read frame .*broken/00001.jpg .*nothing was processed'):
        evs.main([*ARCH, '--pretrained_weights', str(weights), '--data_path', str(tmp_path / 'davis'),
                  '--output_dir', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


# ============ attention maps ============

def test_cls_attention_maps_are_the_last_attention_row_summing_to_one(model):
    images = torch.randn(2, 3, 48, 80)
    maps = model.cls_attention_maps(images)
    assert maps.shape == (2, 3, 3, 5)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 3))
    with torch.no_grad():
        row = model.get_last_selfattention(images)[:, :, 0, 1:]
    torch.testing.assert_close(maps.flatten(-2), row / row.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_attention_mass_masks_keep_the_stated_fraction():
    maps = torch.tensor([[[0.5, 0.1], [0.3, 0.1]]])
    assert evaluation.attention_mass_masks(maps, 0.6).tolist() == [[[True, False], [True, False]]]
    assert evaluation.attention_mass_masks(maps, 0.4).tolist() == [[[True, False], [False, False]]]
    torch.manual_seed(0)
    maps = torch.rand(4, 6, 7) ** 3
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    for threshold in (0.3, 0.6, 0.9):
        masks = evaluation.attention_mass_masks(maps, threshold)
        for m, keep in zip(maps, masks):
            kept = m[keep]
            assert kept.sum() >= threshold - 1e-6               # at least the stated mass ...
            assert kept.sum() - kept.min() < threshold          # ... with as few patches as possible
            assert kept.min() >= m[~keep].max()                 # and the strongest ones


def test_attention_transform_resizes_like_torchvision_and_normalises():
    img = Image.new('RGB', (451, 300), (255, 128, 0))
    assert evaluation.attention_transform(72)(img).shape == (3, 72, 108)  # short side 72, int(72 * 451 / 300)
    assert evaluation.attention_transform(72)(img.transpose(Image.Transpose.ROTATE_90)).shape == (3, 108, 72)
    assert evaluation.attention_transform((72, 100))(img).shape == (3, 72, 100)
    pixel = evaluation.attention_transform()(img)[:, 0, 0]
    expected = [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    torch.testing.assert_close(pixel, torch.tensor(expected))
    assert evaluation.crop_to_patch_multiple(torch.zeros(1, 3, 72, 108), 16).shape == (1, 3, 64, 96)


def test_visualize_attention_on_a_sample_photograph(tmp_path, weights, model):
    out = tmp_path / 'out'
    proc = run_script('visualize_attention.py', *ARCH, '--pretrained_weights', weights,
                      '--image_size', '72', '100', '--threshold', '0.6', '--output_dir', out)
    assert "scikit-image's sample photograph" in proc.stdout
    names = ['img.png'] + [f'attn-head{h}.png' for h in range(3)] + [f'mask_th0.6_head{h}.png' for h in range(3)]
    assert sorted(p.name for p in out.iterdir() if p.name[0] != '.') == sorted(names)
    for name in names:
        with Image.open(out / name) as img:
            assert img.size == (96, 64)  # 72x100 cropped to whole 16-pixel patches

    # the same maps and masks computed here, then checked against the saved overlays
    from skimage import data
    img = evaluation.attention_transform((72, 100))(Image.fromarray(data.chelsea()))
    img = evaluation.crop_to_patch_multiple(img, 16).unsqueeze(0)
    maps = model.cls_attention_maps(img)[0]
    masks = evaluation.upsample_patches(evaluation.attention_mass_masks(maps, 0.6), 16).numpy()
    image = np.asarray(Image.open(out / 'img.png')).astype(np.float32)
    for head, mask in enumerate(masks):
        overlay = np.asarray(Image.open(out / f'mask_th0.6_head{head}.png')).astype(np.float32)
        inside = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                           borderValue=0).astype(bool)  # contours run along the image edge too
        outside = ~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert inside.any() and outside.any()
        np.testing.assert_allclose(overlay[outside], image[outside])
        blended = image[inside] * 0.5 + np.array([255, 0, 0]) * 0.5
        np.testing.assert_allclose(overlay[inside], blended, atol=1)
        heat = np.asarray(Image.open(out / f'attn-head{head}.png'))
        np.testing.assert_array_equal(heat, evaluation.colorize(evaluation.upsample_patches(maps[head], 16).numpy()))


def test_visualize_attention_rejects_a_file_that_is_not_an_image(tmp_path):
    import visualize_attention
    (tmp_path / 'notes.jpg').write_text('not an image')
    with pytest.raises(SystemExit, match=r'^error: cannot read image .*notes.jpg'):
        visualize_attention.load_image(str(tmp_path / 'notes.jpg'))
    with pytest.raises(SystemExit, match=r'^error: --image_path .* is not a file'):
        visualize_attention.load_image(str(tmp_path / 'missing.jpg'))


# ============ attention videos ============

def write_test_video(path, n_frames=8, size=(96, 64), fps=10):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, size)
    for t in range(n_frames):
        frame = np.full((size[1], size[0], 3), 70, np.uint8)
        cv2.circle(frame, (12 + 9 * t, size[1] // 2), 12, (40, 40, 230), -1)
        writer.write(frame)
    writer.release()


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def test_video_generation_from_a_video_file_then_video_only(tmp_path, weights, model):
    write_test_video(tmp_path / 'input.mp4')
    out = tmp_path / 'out'
    run_script('video_generation.py', *ARCH, '--pretrained_weights', weights, '--input_path',
               tmp_path / 'input.mp4', '--output_path', out, '--batch_size', '3', '--outline', 'true',
               '--renormalise_heads', 'true')
    frames, fps = read_video(out / 'video.mp4')
    assert len(frames) == 8 and frames[0].shape == (64, 96, 3) and fps == pytest.approx(10)
    assert len(list((out / 'frames').iterdir())) == 8
    attention_images = sorted((out / 'attention').iterdir())
    assert [p.name for p in attention_images] == [f'attn-frame-{t:04}.jpg' for t in range(8)]

    # with both options, an attention image is the inferno-coloured mean over heads of the renormalised maps,
    # outlined (the original's frames, the default, are checked in test_original.py)
    frame = evaluation.attention_transform()(Image.open(out / 'frames' / 'frame-0003.jpg').convert('RGB'))
    mean_map = model.cls_attention_maps(frame.unsqueeze(0))[0].mean(dim=0)
    expected = evaluation.colorize(evaluation.upsample_patches(mean_map, 16).numpy(), 'inferno').astype(np.float32)
    saved = np.asarray(Image.open(attention_images[3])).astype(np.float32)
    outline = evaluation.upsample_patches(evaluation.attention_mass_masks(mean_map, 0.6), 16).numpy()
    outlined = evaluation.draw_mask(expected.astype(np.uint8), outline, color=(255, 255, 255), fill=False)
    error = np.abs(saved - outlined)
    assert np.median(error) <= 3 and error.mean() < 8  # JPEG noise (ringing along the outline)
    assert np.abs(saved - expected).mean() > 2 * error.mean()  # the outline is there

    run_script('video_generation.py', '--input_path', out / 'attention', '--output_path', tmp_path / 'avi',
               '--video_only', '--video_format', 'avi', '--fps', '5')
    frames, fps = read_video(tmp_path / 'avi' / 'video.avi')
    assert len(frames) == 8 and frames[0].shape == (64, 96, 3) and fps == pytest.approx(5)


def test_video_generation_rejects_an_unreadable_video(tmp_path):
    import video_generation
    (tmp_path / 'broken.mp4').write_bytes(b'\x00' * 2048)
    with pytest.raises(SystemExit, match=r'^error: cannot read video .*broken.mp4'):
        video_generation.extract_frames_from_video(str(tmp_path / 'broken.mp4'), str(tmp_path / 'frames'), 30.)
    assert not (tmp_path / 'frames').exists()
