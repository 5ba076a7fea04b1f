"""How messages read: a backbone, class or count named in one takes the article it is read with ("an SD3
student", not "a sd3 student")."""


def test_a_name_in_a_message_gets_the_article_it_is_read_with():
    from dmdr_rl.cli import with_article

    said = [with_article(word) for word in ("SD3", "Flux", "toy", "my_dit:build", "SD3Transformer2DModel",
                                            "UNet2DConditionModel", "8-step", "11-step", "18-step", "1-step", "4-step",
                                            "80-step", "110-step", "int", "list")]
    assert said == ["an SD3", "a Flux", "a toy", "a my_dit:build", "an SD3Transformer2DModel", "a UNet2DConditionModel",
                    "an 8-step", "an 11-step", "an 18-step", "a 1-step", "a 4-step", "an 80-step", "a 110-step", "an int",
                    "a list"]
