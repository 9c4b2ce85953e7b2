"""The Lightning callback records a real ``lightning`` Trainer run into a directory load_run opens."""
import pytest
import torch
import torch.nn.functional as F

from cbnorm.runs import load_run, read_metric_lines, run_status

from test_record import Net, _data

pl = pytest.importorskip("lightning.pytorch")
from cbnorm.integrations.lightning import NormRecorder  # noqa: E402

pytestmark = pytest.mark.timeout(180)


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_lightning_trainer_run_is_recorded(tmp_path):
    torch.manual_seed(0)
    x, y = _data(64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    probe = _data(32, seed=5)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[NormRecorder(tmp_path / "pl", probe=probe, every=5, early=0,
                                                 class_names=list("abcde"))])
    trainer.fit(Module(), data, data)
    run = load_run(tmp_path / "pl")
    assert run.config["model"]["class"] == "Module"
    assert [li["path"] for li in run.recorded_layers] == ["net.bn1", "net.gn"]
    assert [s for s, _ in run.summaries] == [0, 5, 10, 12]
    lines = read_metric_lines(tmp_path / "pl")
    assert [ln["step"] for ln in lines if "loss" in ln] == list(range(1, 13))
    assert any("val_acc" in ln for ln in lines)  # validation metrics at each validation epoch
    assert run_status(run.path)["state"] == "finished"
    assert run.read_summary(12).values("net.bn1", "x_hat").shape[0] == 6


def test_the_app_opens_a_lightning_run(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from apptest_helpers import no_problem

    torch.manual_seed(0)
    x, y = _data(64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[NormRecorder(tmp_path / "logs" / "pl", probe=_data(32, seed=5), every=4,
                                                 early=0)])
    trainer.fit(Module(), data)
    monkeypatch.setenv("CBNORM_RUNS", str(tmp_path / "logs"))
    at = AppTest.from_file(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "app.py"),
                           default_timeout=180)
    at.run()
    no_problem(at)
    assert at.session_state["run"] == "pl"
    for page in ("pages/1_Activation_Histograms.py", "pages/2_Cluster_Evolution.py",
                 "pages/6_Across_Runs_and_Training.py"):
        at.switch_page(page).run()
        no_problem(at)
        assert at.get("plotly_chart")
