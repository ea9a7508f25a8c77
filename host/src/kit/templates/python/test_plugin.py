"""Unit tests of plugin.py, run natively: python3 -m unittest"""

import unittest

import plugin
import sluice


class PluginTest(unittest.TestCase):
    def tearDown(self):
        sluice.testing.config.clear()

    def test_uppercases_onto_the_output_topic_keeping_the_key(self):
        [out] = plugin.handle(sluice.message("hello", key="k1"))
        self.assertEqual(out.topic, "{{name}}.out")
        self.assertEqual(out.key, "k1")
        self.assertEqual(out.payload, b"HELLO")
        self.assertEqual(sluice.header(out, "by"), "{{name}}")

    def test_the_config_names_the_topic(self):
        sluice.testing.config["output"] = "elsewhere"
        [out] = plugin.handle(sluice.message("hello"))
        self.assertEqual(out.topic, "elsewhere")

    def test_rejects_an_empty_message(self):
        with self.assertRaisesRegex(sluice.Reject, "empty payload"):
            plugin.handle(sluice.message(""))


if __name__ == "__main__":
    unittest.main()
