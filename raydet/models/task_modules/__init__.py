"""What dense and RoI heads use to make training targets, one subpackage per concept and one module per kind
(MMDetection's ``task_modules``): prior generators (anchors, points), assigners (prior -> gt), samplers (which
assigned priors train), coders (box <-> regression target)."""
