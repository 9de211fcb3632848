"""The page at "/", driven in a real headless Chromium against a real `python -m service`.

Uses Debian's chromium and chromedriver (scripts/test.sh installs them) so that nothing
is downloaded; selenium is pointed at both binaries explicitly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.service_support import ServiceProcess, make_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 60


def person_crop(path: Path, seed: int) -> Path:
    """A 128x64 crop with its own colours and texture, standing in for a person."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, size=(2, 3))
    pixels = np.empty((128, 64, 3), dtype=np.float32)
    pixels[:64] = top
    pixels[64:] = bottom
    pixels += rng.normal(0, 25, size=pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return path


@contextlib.contextmanager
def running_service(tmp: Path, **settings: str):
    """`python -m service` on a free port with an untrained HA-CNN; yields its URL."""
    checkpoint = make_checkpoint(tmp / "hacnn.safetensors")
    with ServiceProcess(checkpoint, tmp / "data", **settings) as service:
        yield service.url


# The untrained network scores an exact copy of an enrolled crop at 1.0 and any other crop lower.
MATCH_THRESHOLD = 0.9999


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("page-service"), match_threshold=str(MATCH_THRESHOLD)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1100",
                 # a synthetic camera, granted without a prompt, for the camera capture test
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, message: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message)


def enroll(driver, identity: str, crops: list[Path]) -> None:
    field = driver.find_element(By.ID, "enroll-identity")
    field.clear()
    field.send_keys(identity)
    driver.find_element(By.ID, "enroll-files").send_keys("\n".join(str(p) for p in crops))
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#enroll-pending img")) == len(crops),
             "selected crops not previewed")
    driver.find_element(By.ID, "enroll-submit").click()
    wait_for(driver, expected_conditions.text_to_be_present_in_element(
        (By.ID, "enroll-message"), f"enrolled {len(crops)} crop(s) as {identity}"),
        f"enrolling {identity} not confirmed: {driver.find_element(By.ID, 'enroll-error').text}")


def identity_counts(driver) -> dict[str, str]:
    """{identity: crop count} as listed; read in one script call, as the list re-renders."""
    return driver.execute_script("""
        const rows = document.querySelectorAll("#identity-rows tr.identity-row");
        return Object.fromEntries([...rows].map((r) => [r.dataset.identity, r.querySelector("td.count").textContent]));
    """)


def query(driver, *crops: Path) -> None:
    chooser = driver.find_element(By.ID, "query-file")
    chooser.clear()  # a multiple-file input would otherwise add these to the previous selection
    chooser.send_keys("\n".join(str(c) for c in crops))
    driver.find_element(By.ID, "query-submit").click()


def test_enroll_two_identities_then_query_ranks_the_right_one_first(browser, service_url, tmp_path):
    alice = [person_crop(tmp_path / f"alice{i}.jpg", seed=10 + i) for i in range(2)]
    bob = [person_crop(tmp_path / f"bob{i}.jpg", seed=20 + i) for i in range(3)]

    browser.get(service_url + "/")
    wait_for(browser, expected_conditions.text_to_be_present_in_element((By.ID, "service-status"), "ready"),
             "page never saw the service ready")
    enroll(browser, "alice", alice)
    enroll(browser, "bob", bob)
    wait_for(browser, lambda d: identity_counts(d) == {"alice": "2", "bob": "3"},
             "identity list does not show both identities with their crop counts")

    query(browser, bob[1])
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.match"), "no ranked matches shown")
    matches = browser.find_elements(By.CSS_SELECTOR, "#results li.match")
    assert [m.find_element(By.CSS_SELECTOR, ".identity").text for m in matches] == ["bob", "alice"]
    # The exact crop is in the gallery, so the best score is a cosine of 1.
    assert matches[0].find_element(By.CSS_SELECTOR, ".score").text.startswith("1.000")
    top_crop = matches[0].find_element(By.TAG_NAME, "img")
    assert "/crops/" in top_crop.get_attribute("src")
    wait_for(browser, lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", top_crop),
        "the best match's gallery crop did not load")


def test_upload_of_a_non_image_shows_the_services_message(browser, service_url, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a JPEG")
    expected = httpx.post(f"{service_url}/query", files={"image": (not_an_image.name, not_an_image.read_bytes())}, timeout=30)
    assert expected.status_code in (400, 413, 415, 422)
    detail = expected.json()["detail"]

    browser.get(service_url + "/")
    query(browser, not_an_image)
    error = wait_for(browser, expected_conditions.visibility_of_element_located((By.ID, "query-error")),
                     "no error shown for a non-image upload")
    assert detail in error.text
    assert str(expected.status_code) in error.text


def test_delete_button_removes_the_identity(browser, service_url, tmp_path):
    crops = [person_crop(tmp_path / "carol.jpg", seed=30)]
    browser.get(service_url + "/")
    enroll(browser, "carol", crops)
    wait_for(browser, lambda d: "carol" in identity_counts(d), "carol not listed after enrolling")

    row = browser.find_element(By.CSS_SELECTOR, '#identity-rows tr[data-identity="carol"]')
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    wait_for(browser, expected_conditions.alert_is_present(), "no confirmation asked before deleting")
    browser.switch_to.alert.accept()
    wait_for(browser, lambda d: "carol" not in identity_counts(d), "carol still listed after delete")
    assert httpx.get(f"{service_url}/gallery/carol", timeout=10).status_code == 404


def test_api_key_field_unlocks_a_protected_gallery(browser, tmp_path):
    crops = [person_crop(tmp_path / "dave.jpg", seed=40)]
    with running_service(tmp_path, api_key="s3cret-key") as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "enroll-identity").send_keys("dave")
        browser.find_element(By.ID, "enroll-files").send_keys(str(crops[0]))
        browser.find_element(By.ID, "enroll-submit").click()
        error = wait_for(browser, expected_conditions.visibility_of_element_located((By.ID, "enroll-error")),
                         "no error shown when enrolling without the API key")
        assert "401" in error.text or "403" in error.text

        browser.find_element(By.ID, "api-key").send_keys("s3cret-key")
        browser.find_element(By.ID, "enroll-submit").click()
        wait_for(browser, expected_conditions.text_to_be_present_in_element(
            (By.ID, "enroll-message"), "enrolled 1 crop(s) as dave"), "enrolling with the API key failed")
        assert httpx.get(f"{url}/gallery/dave", timeout=10).status_code == 200


def test_page_loads_nothing_from_outside_the_service(browser, service_url):
    browser.get(service_url + "/")
    wait_for(browser, expected_conditions.text_to_be_present_in_element((By.ID, "service-status"), "ready"),
             "page never saw the service ready")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert any(url.endswith("/static/app.js") for url in loaded)
    assert any(url.endswith("/static/style.css") for url in loaded)
    assert [url for url in loaded if not url.startswith(service_url + "/")] == []


def test_camera_capture_enrolls_frames(browser, service_url):
    browser.get(service_url + "/")
    browser.find_element(By.ID, "enroll-identity").send_keys("erin")
    browser.find_element(By.ID, "enroll-camera-button").click()
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('camera-video').videoWidth > 0"),
             f"camera never started: {browser.find_element(By.ID, 'camera-error').text}")
    for shots in (1, 2):
        browser.find_element(By.ID, "camera-capture").click()
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#enroll-pending img")) == shots,
                 "captured frame not added to the crops to enroll")
    browser.find_element(By.ID, "camera-close").click()
    browser.find_element(By.ID, "enroll-submit").click()
    wait_for(browser, expected_conditions.text_to_be_present_in_element(
        (By.ID, "enroll-message"), "enrolled 2 crop(s) as erin"), "camera frames were not enrolled")


def test_query_shows_the_decision_and_the_threshold(browser, service_url, tmp_path):
    frank = [person_crop(tmp_path / f"frank{i}.jpg", seed=50 + i) for i in range(2)]
    stranger = person_crop(tmp_path / "stranger.jpg", seed=60)
    browser.get(service_url + "/")
    wait_for(browser, expected_conditions.text_to_be_present_in_element((By.ID, "service-status"), "threshold 1.000"),
             "status line does not show the threshold in force")
    enroll(browser, "frank", frank)

    query(browser, frank[0])
    decision = wait_for(browser, expected_conditions.visibility_of_element_located((By.ID, "query-decision")),
                        "no decision shown")
    wait_for(browser, lambda d: decision.get_attribute("data-decision") == "known", "decision not 'known'")
    assert "Known: frank" in decision.text and "threshold 1.000 (REID_MATCH_THRESHOLD)" in decision.text
    first = browser.find_element(By.CSS_SELECTOR, "#results li.match")
    assert "pass" in first.get_attribute("class") and first.find_element(By.CSS_SELECTOR, ".verdict").text == "match"

    query(browser, stranger)
    wait_for(browser, lambda d: decision.get_attribute("data-decision") == "unknown", "decision not 'unknown'")
    assert "tracklet" not in browser.find_element(By.ID, "query-message").text  # one crop, not the two chosen so far
    assert "Unknown person" in decision.text and "< threshold 1.000" in decision.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results li.match.pass")


def test_several_query_crops_are_one_tracklet(browser, service_url, tmp_path):
    crops = [person_crop(tmp_path / f"gina{i}.jpg", seed=70 + i) for i in range(3)]
    browser.get(service_url + "/")
    enroll(browser, "gina", crops[:1])
    query(browser, *crops)
    wait_for(browser, expected_conditions.text_to_be_present_in_element((By.ID, "query-message"), "tracklet of 3 crops"),
             f"tracklet query not confirmed: {browser.find_element(By.ID, 'query-error').text}")
    assert browser.find_element(By.ID, "query-caption").text == "query: 3 crops"


def test_enrolling_the_same_crop_under_another_name_warns(browser, service_url, tmp_path):
    crop = person_crop(tmp_path / "hank.jpg", seed=80)
    browser.get(service_url + "/")
    enroll(browser, "hank", [crop])
    enroll(browser, "hank-again", [crop])
    warning = wait_for(browser, expected_conditions.visibility_of_element_located((By.ID, "enroll-warning")),
                       "no duplicate warning shown")
    assert "Likely duplicate" in warning.text and "hank (1.000)" in warning.text
